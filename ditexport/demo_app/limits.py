"""What one demo request may ask for (this server's limits), and the demo's user errors."""
from __future__ import annotations

import logging

from ..errors import DitexportError, UsageError
from ..limits import DemoLimits


log = logging.getLogger("ditexport.demo")  # one logger for the demo's modules

BUILTIN_KEY = "digits (built-in)"
SEED_MAX = 2**31 - 1
NO_BLEND = -1  # the "blend with" menu's value for plain sampling


class DemoInputError(DitexportError):
    """A request outside the server's limits or naming something this server does not have."""


class DemoBusyError(DemoInputError):
    """The demo already holds `DemoLimits.max_queue` requests; the user should try again shortly."""


#################################################################################
#                                     Limits                                    #
#################################################################################

def check_limits(limits: DemoLimits, steps: int, num_images: int, guidance: float, seed: int,
                 blend_weight: float) -> None:
    """Raises one DemoInputError naming the first field out of range."""
    try:
        limits.check(num_images, steps, guidance, names=WIDGET_NAMES)
    except UsageError as e:
        raise DemoInputError(str(e)) from None
    for name, value, low, high in (("seed", seed, 0, SEED_MAX), ("blend", blend_weight, 0.0, 1.0)):
        if value is None or not (low <= value <= high):
            raise DemoInputError(f"{name} must be between {low} and {high} on this server, got {value}")


WIDGET_NAMES = {"num_images": "number of images", "num_steps": "steps", "guidance_scale": "guidance scale"}
