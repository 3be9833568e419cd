"""One renderer per NFFA-Europe class: (rng, w, h) -> float32 (h, w) on roughly 0-1, before
the instrument's effects (sem_cls.data.synthetic.instrument)."""

from sem_cls.data.synthetic.biological import biological
from sem_cls.data.synthetic.devices import mems, patterned, tips
from sem_cls.data.synthetic.materials import fibres, films, nanowires, particles, porous, powder

RENDERERS = {
    "Biological": biological,
    "Fibres": fibres,
    "Films_Coated_Surface": films,
    "MEMS_devices_and_electrodes": mems,
    "Nanowires": nanowires,
    "Particles": particles,
    "Patterned_surface": patterned,
    "Porous_Sponge": porous,
    "Powder": powder,
    "Tips": tips,
}

# The NFFA-Europe classes in the dataset's (alphabetical) order; a class's index seeds its
# images, so this order is part of the generated data.
CLASSES: tuple[str, ...] = tuple(RENDERERS)
