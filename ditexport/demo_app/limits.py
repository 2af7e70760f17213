"""What one demo request may ask for (this server's limits), and the demo's user errors."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import DitexportError


log = logging.getLogger("ditexport.demo")  # one logger for the demo's modules

BUILTIN_KEY = "digits (built-in)"
SEED_MAX = 2**31 - 1
NO_BLEND = -1  # the "blend with" menu's value for plain sampling


class DemoInputError(DitexportError):
    """A request outside the server's limits or naming something this server does not have."""


#################################################################################
#                                     Limits                                    #
#################################################################################

@dataclass(frozen=True)
class DemoLimits:
    """Server-side bounds on one request: anything outside gets a clear error instead of a long wait."""
    max_steps: int = 1000        # the diffusion has 1000 timesteps; more cannot be respaced
    max_images: int = 16         # one request must not hold a backend for long
    max_guidance: float = 20.0   # far beyond any useful scale (official: 4), still finite

    def check(self, steps: int, num_images: int, guidance: float, seed: int, blend_weight: float) -> None:
        """Raises one DemoInputError naming the first field out of range."""
        checks = [
            ("steps", steps, 1, self.max_steps),
            ("number of images", num_images, 1, self.max_images),
            ("guidance scale", guidance, 1.0, self.max_guidance),
            ("seed", seed, 0, SEED_MAX),
            ("blend", blend_weight, 0.0, 1.0),
        ]
        for name, value, low, high in checks:
            if value is None or not (low <= value <= high):
                raise DemoInputError(f"{name} must be between {low} and {high} on this server, got {value}")
