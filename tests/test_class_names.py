"""The shipped ImageNet class names and the labels the demo shows."""
from ditexport.class_names import class_label, class_names, imagenet_class_names


def test_imagenet_names_are_the_1000_classes_in_label_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    # Labels the official DiT sample.py draws, and both ends of the list.
    known = {0: "tench", 88: "macaw", 207: "golden retriever", 279: "Arctic fox", 360: "otter",
             387: "lesser panda", 417: "balloon", 974: "geyser", 999: "toilet tissue"}
    assert {i: names[i] for i in known} == known


def test_menu_labels_are_unique_although_two_names_repeat():
    names = class_names(1000)
    assert names.count("crane") == 2 and names.count("maillot") == 2
    labels = [class_label(i, n) for i, n in enumerate(names)]
    assert len(set(labels)) == 1000
    assert labels[134] == "134: crane" and labels[517] == "517: crane"


def test_digits_and_other_models():
    assert [class_label(i, n) for i, n in enumerate(class_names(10, "digits"))] == [str(i) for i in range(10)]
    assert class_names(3) == ["class 0", "class 1", "class 2"]
