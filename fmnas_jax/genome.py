"""Genomes, the search space they live in, and their parameter counts.

Pure Python on purpose: no jax, no mlflow, no Hydra, so a genome can be parsed,
validated, mutated and sized anywhere.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

ACTIVATIONS: tuple[str, ...] = ("relu", "sigmoid", "tanh", "swish", "gelu")
LAYER_TYPES: tuple[str, ...] = ("NC", "RC")
HEAD_UNITS = 64  # the paper's head: GAP -> Dense(64, act) -> Dense(classes)


@dataclass(frozen=True)
class ImageShape:
    """What the data gives the model: images of height x width x channels, and the number of classes."""

    height: int = 28
    width: int = 28
    channels: int = 1
    classes: int = 10

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 1 or self.channels not in (1, 3) or self.classes < 2:
            raise ValueError(f"data shape {self.height}x{self.width}x{self.channels} with {self.classes} classes: images need "
                             "a positive height and width, 1 or 3 channels, and at least 2 classes")  # fmt: skip

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}, {self.classes} classes"

    @property
    def hw(self) -> tuple[int, int]:
        return (self.height, self.width)


FASHION_MNIST = ImageShape()  # 28 x 28 greyscale, 10 classes: the default data and the paper's


@dataclass(frozen=True)
class SearchSpace:
    """Allowed genes; the layout is fixed per space (the paper: NC, RC, NC, RC, then FL)."""

    kernel_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    filters: tuple[int, ...] = (4, 8, 16, 32, 64)
    activations: tuple[str, ...] = ACTIVATIONS
    layout: tuple[str, ...] = ("NC", "RC", "NC", "RC")
    max_params: int | None = None  # a size constraint: larger genomes are outside the space (never sampled or trained)
    image: ImageShape = field(default=FASHION_MNIST, init=False)  # the data's shape: for_image(), from the data, not a setting

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(sorted(set(self.kernel_sizes))))
        object.__setattr__(self, "filters", tuple(sorted(set(self.filters))))
        object.__setattr__(self, "activations", tuple(self.activations))
        object.__setattr__(self, "layout", tuple(self.layout))
        if not self.kernel_sizes or not self.filters or not self.activations or not self.layout:
            raise ValueError("search space: kernel_sizes, filters, activations and layout must be non-empty")
        bad_k = [k for k in self.kernel_sizes if not isinstance(k, int) or not 1 <= k <= 7]
        if bad_k:
            raise ValueError(f"search space: kernel sizes {bad_k} are not in [1..7]")
        bad_f = [f for f in self.filters if not isinstance(f, int) or f < 1]
        if bad_f:
            raise ValueError(f"search space: filter counts {bad_f} must be positive integers")
        bad_a = [a for a in self.activations if a not in ACTIVATIONS]
        if bad_a:
            raise ValueError(f"search space: activations {bad_a} are not in {list(ACTIVATIONS)}")
        bad_t = [t for t in self.layout if t not in LAYER_TYPES]
        if bad_t:
            raise ValueError(f"search space: layer types {bad_t} are not in {list(LAYER_TYPES)}")
        if self.max_params is not None and self.max_params < 1:
            raise ValueError(f"search space: max_params {self.max_params} must be a positive integer or null")
        # 'valid' stride-2 convs shrink the image: every layout must keep it at least 1x1.
        self._check_image()

    def for_image(self, image: ImageShape) -> SearchSpace:
        """This space over data of shape `image` (ValueError when its layout shrinks those images to nothing)."""
        space = copy.copy(self)
        object.__setattr__(space, "image", image)
        space._check_image()
        return space

    def _check_image(self) -> None:
        h, w = self.image.hw
        for t in self.layout:
            if t == "RC":
                h, w = (h - max(self.kernel_sizes)) // 2 + 1, (w - max(self.kernel_sizes)) // 2 + 1
            if min(h, w) < 1:
                k, size = max(self.kernel_sizes), f"{self.image.height}x{self.image.width}"
                raise ValueError(f"search space: layout {list(self.layout)} with kernel {k} shrinks the data's {size} images "
                                 "to nothing (smaller kernel_sizes or fewer RC layers)")  # fmt: skip

    def kernel_range(self) -> str:
        """Allowed kernel sizes, as `[1..7]` when contiguous."""
        ks = self.kernel_sizes
        if ks == tuple(range(ks[0], ks[-1] + 1)):
            return f"[{ks[0]}..{ks[-1]}]"
        return str(list(ks))

    def fits(self, genome: Genome) -> bool:
        """Whether the genome keeps to the space's size constraint (max_params)."""
        return self.max_params is None or count_params(genome, self.image) <= self.max_params

    @property
    def size(self) -> int:
        """Number of distinct genomes in the space."""
        per_conv = len(self.kernel_sizes) * len(self.filters) * len(self.activations)
        return per_conv ** len(self.layout) * len(self.activations)


@dataclass(frozen=True)
class ConvGene:
    """One convolution: NC (stride 1, SAME) or RC (stride 2, VALID)."""

    kind: str
    filters: int
    kernel: int
    activation: str

    def __str__(self) -> str:
        return f"{self.kind} {self.filters} {self.kernel} {self.activation}"

    @property
    def stride(self) -> int:
        return 1 if self.kind == "NC" else 2

    @property
    def padding(self) -> str:
        return "SAME" if self.kind == "NC" else "VALID"


@dataclass(frozen=True)
class Genome:
    """An immutable architecture: conv genes then the head (FL) activation."""

    convs: tuple[ConvGene, ...]
    head_activation: str
    _str: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "convs", tuple(self.convs))
        text = "".join(f"{c};" for c in self.convs) + f"FL {self.head_activation};"
        object.__setattr__(self, "_str", text)

    def __str__(self) -> str:
        return self._str

    @property
    def short(self) -> str:
        """A compact, still unique name for tables and legends: filters x kernel + activation per layer, then the head.

        `NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;` -> `4x5sig 64x3rel 4x5sig 64x3rel | gel`
        (the layer kinds are fixed by the layout).
        """
        return " ".join(f"{c.filters}x{c.kernel}{c.activation[:3]}" for c in self.convs) + f" | {self.head_activation[:3]}"

    @property
    def key(self) -> str:
        """Stable 16-hex-digit key: sha256 of the canonical string."""
        return hashlib.sha256(self._str.encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str, space: SearchSpace | None = None) -> Genome:
        """Parse the paper's format and validate it against `space` (default space if None)."""
        return parse_genome(text, space or SearchSpace())


def _layer_error(subject: str, index: int, kind: str, problem: str) -> ValueError:
    return ValueError(f"{subject} in layer {index} ({kind}) {problem}")


def genome_in(text: str, space: SearchSpace) -> Genome | None:
    """The genome `text` names if `space` contains it, else None (a stored row of another space or layout)."""
    try:
        return parse_genome(text, space)
    except ValueError:
        return None


def parse_genome(text: str, space: SearchSpace) -> Genome:
    """Parse `NC 4 5 sigmoid;RC 64 3 relu;...;FL gelu;` into a validated Genome."""
    if not isinstance(text, str):
        raise ValueError(f"genome must be a string like {EXAMPLE!r}, got {type(text).__name__} {text!r}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"genome is empty; expected a string like {EXAMPLE!r}")
    tokens = [t.strip() for t in stripped.split(";")]
    if tokens[-1] == "":
        tokens = tokens[:-1]
    expected = len(space.layout) + 1
    if len(tokens) != expected:
        raise ValueError(f"genome {text!r} has {len(tokens)} layers; expected {expected} ({', '.join(space.layout)}, FL), e.g. {EXAMPLE!r}")
    convs = []
    for i, (token, kind) in enumerate(zip(tokens[:-1], space.layout, strict=True), start=1):
        convs.append(_parse_conv(token, i, kind, space))
    head = _parse_head(tokens[-1], expected, space)
    genome = Genome(tuple(convs), head)
    if not space.fits(genome):
        raise ValueError(
            f"genome {genome} has {count_params(genome, space.image):,} parameters; the search space allows at most {space.max_params:,}"
        )
    return genome


def _parse_conv(token: str, index: int, kind: str, space: SearchSpace) -> ConvGene:
    parts = token.split()
    if len(parts) != 4:
        raise _layer_error(f"{token!r}", index, kind, f"is malformed: expected '{kind} <filters> <kernel> <activation>'")
    t, f, k, act = parts
    if t != kind:
        raise _layer_error(f"layer type {t!r}", index, kind, f"is not allowed: the layout is {list(space.layout)}")
    if not f.isdigit():
        raise _layer_error(f"filters {f!r}", index, kind, f"is not an integer from {list(space.filters)}")
    if int(f) not in space.filters:
        raise _layer_error(f"filters {f}", index, kind, f"is not in {list(space.filters)}")
    if not k.isdigit():
        raise _layer_error(f"kernel size {k!r}", index, kind, f"is not an integer in {space.kernel_range()}")
    if int(k) not in space.kernel_sizes:
        raise _layer_error(f"kernel size {k}", index, kind, f"is not in {space.kernel_range()}")
    if act not in space.activations:
        raise _layer_error(f"activation {act!r}", index, kind, f"is not in {list(space.activations)}")
    return ConvGene(kind, int(f), int(k), act)


def _parse_head(token: str, index: int, space: SearchSpace) -> str:
    parts = token.split()
    if len(parts) != 2 or parts[0] != "FL":
        raise _layer_error(f"head {token!r}", index, "FL", "is malformed: expected 'FL <activation>'")
    if parts[1] not in space.activations:
        raise _layer_error(f"activation {parts[1]!r}", index, "FL", f"is not in {list(space.activations)}")
    return parts[1]


# The paper's winner (16,598 parameters, 88.55% test there): the example every message and test uses.
PAPER_GENOME = "NC 4 5 sigmoid;RC 64 3 relu;NC 4 5 sigmoid;RC 64 3 relu;FL gelu;"
EXAMPLE = PAPER_GENOME


# ---------------------------------------------------------------------------
# Shapes and parameter counts
# ---------------------------------------------------------------------------


def conv_output(kind: str, kernel: int, hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size (height, width) after one conv: NC keeps it, RC (stride 2, valid) shrinks it."""
    return hw if kind == "NC" else ((hw[0] - kernel) // 2 + 1, (hw[1] - kernel) // 2 + 1)


def output_shapes(genome: Genome, image: ImageShape = FASHION_MNIST) -> list[tuple[int, int]]:
    """Spatial size (height, width) after each conv layer."""
    hw, out = image.hw, []
    for c in genome.convs:
        hw = conv_output(c.kind, c.kernel, hw)
        out.append(hw)
    return out


def count_params(genome: Genome, image: ImageShape = FASHION_MNIST) -> int:
    """Parameters as Keras' count_params(): conv, BatchNorm (4 per channel) and the head."""
    total, c_in = 0, image.channels
    for c in genome.convs:
        total += c.kernel * c.kernel * c_in * c.filters + c.filters  # conv kernel + bias
        total += 4 * c.filters  # BatchNorm scale, bias, moving mean, moving variance
        c_in = c.filters
    total += c_in * HEAD_UNITS + HEAD_UNITS + HEAD_UNITS * image.classes + image.classes
    return total


def train_flops_per_image(genome: Genome, image: ImageShape = FASHION_MNIST) -> int:
    """Training FLOPs per image: 3x the forward multiply-adds, 2 FLOPs each."""
    macs, c_in = 0, image.channels
    for c, (h, w) in zip(genome.convs, output_shapes(genome, image), strict=True):
        macs += h * w * c.kernel * c.kernel * c_in * c.filters
        c_in = c.filters
    macs += c_in * HEAD_UNITS + HEAD_UNITS * image.classes
    return 2 * 3 * macs


def activation_elements(genome: Genome, image: ImageShape = FASHION_MNIST) -> int:
    """Activations per image, summed over the conv layers (out_h x out_w x filters): memory traffic that
    FLOPs miss (64 filters at 28x28 train slower than their FLOPs suggest)."""
    return sum(h * w * c.filters for c, (h, w) in zip(genome.convs, output_shapes(genome, image), strict=True))


# ---------------------------------------------------------------------------
# Sampling and neighbourhoods (used by search strategies)
# ---------------------------------------------------------------------------


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A uniformly random genome of `space` (rejection sampling under its max_params)."""
    for _ in range(100_000):
        genome = _random_genes(space, rng)
        if space.fits(genome):
            return genome
    raise ValueError(f"search space: found no genome with at most {space.max_params:,} parameters in 100,000 draws")


def fresh_genome(space: SearchSpace, rng: np.random.Generator, *seen: Container[Genome], draws: int) -> Genome | None:
    """A random genome in none of `seen`, or None when `draws` draws find only seen ones (a nearly exhausted space)."""
    for _ in range(draws):
        genome = random_genome(space, rng)
        if not any(genome in s for s in seen):
            return genome
    return None


def _random_genes(space: SearchSpace, rng: np.random.Generator) -> Genome:
    convs = tuple(
        ConvGene(
            kind,
            int(rng.choice(space.filters)),
            int(rng.choice(space.kernel_sizes)),
            str(rng.choice(space.activations)),
        )
        for kind in space.layout
    )
    return Genome(convs, str(rng.choice(space.activations)))


def sample_population(space: SearchSpace, size: int, rng: np.random.Generator) -> list[Genome]:
    """`size` distinct random genomes, in sampling order."""
    if size < 1:
        raise ValueError(f"population size {size} must be at least 1")
    if size > space.size:
        raise ValueError(f"population size {size} exceeds the {space.size} genomes in the search space")
    seen: dict[str, Genome] = {}
    while len(seen) < size:
        g = random_genome(space, rng)
        seen.setdefault(str(g), g)
    return list(seen.values())


def _steps(values: Sequence, current) -> Iterator:
    i = values.index(current)
    if i > 0:
        yield values[i - 1]
    if i + 1 < len(values):
        yield values[i + 1]


def neighbours(genome: Genome, space: SearchSpace) -> list[Genome]:
    """All genomes of the space one gene away: kernel +-1, filters one step, another activation (convs or head)."""
    out: list[Genome] = []
    for i, c in enumerate(genome.convs):
        variants = [replace(c, kernel=k) for k in _steps(space.kernel_sizes, c.kernel)]
        variants += [replace(c, filters=f) for f in _steps(space.filters, c.filters)]
        variants += [replace(c, activation=a) for a in space.activations if a != c.activation]
        for v in variants:
            out.append(Genome((*genome.convs[:i], v, *genome.convs[i + 1 :]), genome.head_activation))
    out += [Genome(genome.convs, a) for a in space.activations if a != genome.head_activation]
    return [g for g in out if space.fits(g)]


def mutate(genome: Genome, space: SearchSpace, rng: np.random.Generator) -> Genome:
    """One gene changed to another allowed value, chosen uniformly (regularized evolution's mutation)."""
    for _ in range(1000):
        layer = int(rng.integers(len(genome.convs) + 1))
        if layer == len(genome.convs):
            options = [a for a in space.activations if a != genome.head_activation]
            if options:
                child = Genome(genome.convs, str(rng.choice(options)))
            else:
                continue
        else:
            c = genome.convs[layer]
            field_values = {"filters": space.filters, "kernel": space.kernel_sizes, "activation": space.activations}
            name = str(rng.choice(list(field_values)))
            options = [v for v in field_values[name] if v != getattr(c, name)]
            if not options:
                continue
            value = options[int(rng.integers(len(options)))]
            child = Genome((*genome.convs[:layer], replace(c, **{name: value}), *genome.convs[layer + 1 :]), genome.head_activation)
        if space.fits(child):
            return child
    return random_genome(space, rng)  # nothing within one gene fits the size constraint: a fresh start
