"""The Gradio UI laid over DemoService, and `launch`, which serves it. Gradio is imported only here."""
from __future__ import annotations

import time

from ..sampler import SAMPLING_METHODS
from ..errors import DitexportError, shown
from .limits import DemoInputError, DemoLimits, NO_BLEND, log
from .service import create_service, DemoService, GenerateRequest, random_seed


#################################################################################
#                                   Gradio UI                                   #
#################################################################################

def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise DitexportError("the demo needs gradio 6: pip install 'ditexport[demo]'") from None
    return gr


def build_app(service: DemoService):
    """The Gradio Blocks app over `service`; its generate event is the API endpoint "/generate"."""
    gr = _import_gradio()

    first = service.model_keys()[0]
    entry = service.entry(first)
    limits = service.limits

    def model_changed(key):
        e = service.entry(key)
        classes = service.class_choices(key)
        backends = e.backend_choices()
        blend = [("no blend", NO_BLEND)] + classes
        return (gr.Dropdown(choices=backends, value=backends[0] if backends else None),
                gr.Dropdown(choices=classes, value=0), gr.Dropdown(choices=blend, value=NO_BLEND),
                gr.Markdown(f"**Note:** {e.note}" if e.note else "", visible=bool(e.note)))

    def run(model, backend, class_index, blend_class, blend_weight, num_images, guidance, sampler, steps, seed,
            progress=gr.Progress(track_tqdm=True)):
        try:
            request = GenerateRequest(
                model=_as_str(model, "model"), backend=_as_str(backend, "backend"),
                class_index=_as_int(class_index, "class"), num_images=_as_int(num_images, "number of images"),
                guidance=_as_float(guidance, "guidance scale"), sampler=_as_str(sampler, "sampler"),
                steps=_as_int(steps, "steps"), seed=_as_int(seed, "seed"),
                blend_class=_as_int(blend_class, "blend class"), blend_weight=_as_float(blend_weight, "blend"))
            response = service.generate(request, on_wait=lambda msg: progress(0, desc=msg))
        except (DitexportError, ValueError) as e:
            # A rejected request is the user's to fix, not a server fault: no traceback in the server log.
            raise gr.Error(str(e), print_exception=False) from None
        return list(zip(response.images, response.captions)), response.summary

    with gr.Blocks(title="ditexport · DiT demo", analytics_enabled=False) as app:
        gr.Markdown("## ditexport · class-conditional DiT\nSample a class, or blend two classes' "
                    "conditioning vectors, on any runtime this machine has.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(service.model_keys(), value=first, label="Model / export")
                note = gr.Markdown(f"**Note:** {entry.note}" if entry.note else "", visible=bool(entry.note))
                backend = gr.Dropdown(entry.backend_choices(), value=entry.backend_choices()[0], label="Backend")
                class_index = gr.Dropdown(service.class_choices(first), value=0, label="Class")
                with gr.Row():
                    blend_class = gr.Dropdown([("no blend", NO_BLEND)] + service.class_choices(first),
                                              value=NO_BLEND, label="Blend with")
                    blend_weight = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Blend (0 = class, 1 = blend)")
                with gr.Row():
                    sampler = gr.Radio(list(SAMPLING_METHODS), value=GenerateRequest.sampler, label="Sampler")
                    steps = gr.Number(GenerateRequest.steps, label=f"Steps (1-{limits.max_steps})")
                with gr.Row():
                    guidance = gr.Slider(1.0, limits.max_guidance, value=GenerateRequest.guidance, step=0.25,
                                         label="Guidance scale")
                    num_images = gr.Number(GenerateRequest.num_images, label=f"Images (1-{limits.max_images})")
                with gr.Row():
                    seed = gr.Number(GenerateRequest.seed, label="Seed")
                    randomize = gr.Button("Random seed", size="sm")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=4, height="auto", format="png", elem_id="gallery")
                summary = gr.Markdown(elem_id="summary")

        model.change(model_changed, inputs=model, outputs=[backend, class_index, blend_class, note], queue=False)
        randomize.click(random_seed, outputs=seed, queue=False, api_visibility="private")
        # Per-runtime limits are enforced by the service; the queue itself lets requests through to them.
        # preprocess=False: values reach `run` as sent, so the service (not the menus a page started with, nor
        # a rounding Number) judges every request, API calls included, and answers in one message.
        generate.click(run, inputs=[model, backend, class_index, blend_class, blend_weight, num_images, guidance,
                                    sampler, steps, seed], outputs=[gallery, summary], api_name="generate",
                       concurrency_limit=None, preprocess=False)
    app.queue(max_size=limits.max_queue)  # the service refuses beyond the same bound, with a message
    return app


def _as_str(value, name: str) -> str:
    """Menus send strings; the API can send anything, which gets a message, not a traceback."""
    if not isinstance(value, str):
        raise DemoInputError(f"{name} must be a string (a menu choice), got {shown(value)}")
    return value



def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DemoInputError(f"{name} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an integer beyond a float's range, or text that is not a number
        raise DemoInputError(f"{name} must be a number a float can hold, got {shown(value)}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise DemoInputError(f"{name} must be a finite number, got {shown(value)}")
    return number


def _as_int(value, name: str) -> int:
    """Numbers arrive from the API as floats or strings; fractional values are an error, not rounded."""
    number = _as_float(value, name)
    if number != int(number):
        raise DemoInputError(f"{name} must be a whole number, got {shown(value)}")
    return int(number)


def launch(host: str = "127.0.0.1", port: int | None = None, share: bool = False, exports_root: str = "exports",
           device: str = "cpu", limits: DemoLimits | None = None, vae: str | None = None,
           torch_threads: int | None = None, warm_up: bool = True, block: bool = True, server: str | None = None):
    """Builds the service and the app and serves it; returns the app (with `block=False`, still serving).
    With `server`, requests go to a running `python -m ditexport serve` at that URL instead of local backends."""
    started = time.perf_counter()
    _import_gradio()
    if server:
        from .remote import RemoteService

        service = RemoteService(server, limits=limits)
    else:
        service = create_service(exports_root, device, limits, vae)
    from ..threads import describe_threads, resolve_threads

    log.info(f"demo: {describe_threads(*resolve_threads(torch_threads, service.widest_hidden_size()))}")
    if warm_up:
        service.warm_up()
    app = build_app(service)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, ssr_mode=False,
               show_error=True, footer_links=["api"], quiet=True)
    log.info(f"demo: serving {', '.join(service.model_keys())} at {app.local_url} "
             f"(ready {time.perf_counter() - started:.1f} s after launch; Ctrl+C stops it)")
    if share and getattr(app, "share_url", None):
        log.info(f"demo: public share link {app.share_url}")
    if block:
        try:
            app.block_thread()
        finally:
            service.close()
    return app
