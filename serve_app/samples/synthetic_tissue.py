"""Synthetic H&E-like tissue: whole-slide canvases with known tumour regions, and labelled training tiles.

Images are ``(H, W, 3) uint8 RGB`` at a given mpp (microns per pixel). Colour follows Beer-Lambert: a
pixel's optical density (OD) is a haematoxylin concentration (nuclei: purple-blue) times that stain's OD
vector plus an eosin concentration (stroma, cytoplasm: pink) times its own, so staining can vary the way
it does between labs, and ``RGB = 255 * exp(-OD)``.

Everything is laid out in microns, independent of any pixel grid, so that a region looks the same
whatever order its tiles are asked in, and every pyramid level shows the same nuclei at its own mpp:

- where tissue and tumour are: signed distances (µm, positive inside) on a grid of ``FIELD_MPP`` cells,
  which is also the resolution of the ground truth;
- nuclei and glands: drawn per ``BLOCK_UM`` square block from a generator seeded by (seed, block row,
  block column), and cached;
- nuclei shapes: a bank of stamps per kind of nucleus, rasterised once per mpp and added with
  ``np.bincount``; stroma fibres and pixel noise: periodic textures per mpp, indexed by pixel position;
- colour: a table of RGB by (haematoxylin, eosin) per stain style, rather than an exp per pixel.

Rendering at coarse mpp adds up optical densities over each pixel where a scanner's downsampling would
average light, so dense tumour comes out a little darker on a thumbnail than level 0 averaged down.

Normal tissue is pink fibrous stroma with sparse small nuclei (fibroblasts, lymphocytes) and glands (a
pale lumen inside a ring of epithelium with small, regular nuclei); tumour is a dense sheet of large,
pleomorphic, dark nuclei; outside the tissue is glass. Demonstration data, not histology.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import numpy as np
from scipy import ndimage

__all__ = [
    "BLOCK_UM",
    "FIELD_MPP",
    "REFERENCE_STAIN",
    "TRAINING_MPP",
    "TRAINING_TILE_SIZE",
    "GroundTruth",
    "NucleusKind",
    "SlideCanvas",
    "StainStyle",
    "TissueLayout",
    "TissueTextures",
    "iter_training_tiles",
    "make_slide_canvas",
    "make_training_tiles",
    "random_slide_layout",
    "random_stain_style",
]

FIELD_MPP = 16.0  # µm per cell of the tissue / tumour grids, and of the ground truth
BLOCK_UM = 256.0  # side of the square blocks whose nuclei and glands are drawn together
TRAINING_TILE_SIZE = 224
TRAINING_MPP = 0.5

_EDGE_UM = 6.0  # half-width of the soft edge of tissue and tumour regions
_NUCLEUS_GRID_UM = 11.0  # candidate nuclei sit on a jittered grid of this pitch
_GLAND_CELL_UM = 128.0  # at most one gland per cell of this side, and wholly inside it
_NUCLEUS_MARGIN_UM = 14.0  # a nucleus centred this far outside a region can still reach into it
_STAMPS_PER_KIND = 32
_FIBRE_PERIOD_PX = 1024  # the stroma texture repeats every this many pixels, at any mpp
_NOISE_PERIOD_PX = 761  # prime, so the pixel noise never lines up with tiles or the fibres
_FAR_INSIDE_UM = 1.0e4  # a signed distance standing for "nowhere near an edge"
_RAGGED_UM = 6.0  # stroma fibres move the tissue's edge by up to this much either way
# Colour table: concentrations in steps of 1/64 OD, from a few steps below 0 (where noise dips) up to
# 4 OD of haematoxylin (the darkest overlapping nuclei) and 2 OD of eosin.
_STEPS_PER_OD = 64
_BELOW_ZERO_STEPS = 4
_H_LEVELS = _BELOW_ZERO_STEPS + 4 * _STEPS_PER_OD + 1
_E_LEVELS = _BELOW_ZERO_STEPS + 2 * _STEPS_PER_OD + 1
_NOISE_STEPS = 0.8  # scanner noise, in table steps (~0.012 OD)


class NucleusKind(IntEnum):
    FIBROBLAST = 0  # stroma: small, elongated
    LYMPHOCYTE = 1  # stroma: small, round, very dark
    EPITHELIAL = 2  # gland lining: small, round, regular
    TUMOUR = 3  # large, pleomorphic, dark, crowded


@dataclass(frozen=True)
class _NucleusShape:
    radius_um: tuple[float, float]  # equivalent radius (sqrt of semi-axes product)
    elongation: tuple[float, float]  # major / minor semi-axis
    irregularity: float  # amplitude of the outline's low harmonics, relative to the radius
    chromatin: float  # contrast of the coarse chromatin texture inside
    darkness: tuple[float, float]  # haematoxylin concentration at its densest


_NUCLEUS_SHAPES = {
    NucleusKind.FIBROBLAST: _NucleusShape((2.0, 2.8), (2.5, 4.5), 0.04, 0.15, (1.0, 1.4)),
    NucleusKind.LYMPHOCYTE: _NucleusShape((2.1, 2.8), (1.0, 1.15), 0.03, 0.10, (1.5, 1.9)),
    NucleusKind.EPITHELIAL: _NucleusShape((2.5, 3.3), (1.1, 1.5), 0.04, 0.15, (0.9, 1.2)),
    NucleusKind.TUMOUR: _NucleusShape((4.0, 7.5), (1.0, 1.8), 0.18, 0.45, (1.2, 2.0)),
}


@dataclass(frozen=True)
class StainStyle:
    """How one slide (or tile) was stained and scanned; concentrations are in OD units."""

    haematoxylin_od: tuple[float, float, float]  # unit OD vector, (R, G, B)
    eosin_od: tuple[float, float, float]  # unit OD vector, (R, G, B)
    nuclear_haematoxylin: float  # scales every nucleus
    stroma_eosin: float
    tumour_eosin: float  # tumour cells' cytoplasm
    epithelium_eosin: float  # gland lining's cytoplasm
    stroma_haematoxylin: float  # faint haematoxylin everywhere in normal tissue
    tumour_haematoxylin: float  # tumour cytoplasm is bluer than stroma
    glass_od: tuple[float, float, float]  # the empty glass: slightly off-white


# Macenko's reference H&E vectors.
REFERENCE_STAIN = StainStyle(
    haematoxylin_od=(0.5626, 0.7201, 0.4062),
    eosin_od=(0.2159, 0.8012, 0.5581),
    nuclear_haematoxylin=1.0,
    stroma_eosin=0.55,
    tumour_eosin=0.32,
    epithelium_eosin=0.36,
    stroma_haematoxylin=0.04,
    tumour_haematoxylin=0.14,
    glass_od=(0.035, 0.04, 0.03),
)


def random_stain_style(rng: np.random.Generator, strength: float = 1.0) -> StainStyle:
    """``REFERENCE_STAIN`` with its stain vectors turned and its concentrations scaled; 0 keeps it as is."""

    def turned(vector: tuple[float, float, float]) -> tuple[float, float, float]:
        v = np.abs(np.asarray(vector) + rng.normal(0.0, 0.06 * strength, 3)) + 1e-3
        return tuple(float(c) for c in v / np.linalg.norm(v))

    def scaled(value: float, spread: float) -> float:
        return float(value * np.exp(rng.normal(0.0, spread * strength)))

    ref = REFERENCE_STAIN
    return StainStyle(
        haematoxylin_od=turned(ref.haematoxylin_od),
        eosin_od=turned(ref.eosin_od),
        nuclear_haematoxylin=scaled(ref.nuclear_haematoxylin, 0.15),
        stroma_eosin=scaled(ref.stroma_eosin, 0.25),
        tumour_eosin=scaled(ref.tumour_eosin, 0.25),
        epithelium_eosin=scaled(ref.epithelium_eosin, 0.25),
        stroma_haematoxylin=scaled(ref.stroma_haematoxylin, 0.4),
        tumour_haematoxylin=scaled(ref.tumour_haematoxylin, 0.3),
        glass_od=tuple(float(c) for c in np.asarray(ref.glass_od) * np.exp(rng.normal(0.0, 0.3 * strength, 3))),
    )


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class GroundTruth:
    """Labels on a grid of ``mpp`` cells: 0 glass, 1 normal tissue, 2 tumour; ``labels`` is (rows, cols) uint8."""

    labels: np.ndarray
    mpp: float

    GLASS = 0
    NORMAL = 1
    TUMOUR = 2

    @property
    def tumour_mask(self) -> np.ndarray:
        return self.labels == self.TUMOUR

    @property
    def tissue_mask(self) -> np.ndarray:
        return self.labels != self.GLASS


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class TissueLayout:
    """Where tissue and tumour are, as signed distances in µm (positive inside) on a grid of cells.

    ``tissue_distance`` and ``tumour_distance`` are (rows, cols) float32, sampled at the centres of
    ``cell_um`` square cells whose grid starts at ``origin_um`` (y, x) on the slide; tumour lies inside
    tissue. Between cell centres the distances are interpolated bilinearly; beyond the grid, the edge
    cells' values hold.
    """

    tissue_distance: np.ndarray
    tumour_distance: np.ndarray
    cell_um: float = FIELD_MPP
    origin_um: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.tissue_distance.shape != self.tumour_distance.shape or min(self.tissue_distance.shape) < 2:
            raise ValueError(f"layout grids must share one shape of at least 2x2, got {self.tissue_distance.shape}")

    def ground_truth(self) -> GroundTruth:
        """The labels of the grid's cells, judged at their centres."""
        labels = np.where(self.tissue_distance > 0, GroundTruth.NORMAL, GroundTruth.GLASS).astype(np.uint8)
        labels[(self.tumour_distance > 0) & (self.tissue_distance > 0)] = GroundTruth.TUMOUR
        return GroundTruth(labels=labels, mpp=self.cell_um)

    def distances_at(self, y_um: np.ndarray, x_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue and tumour signed distances (µm) at points given in µm; both shaped like ``y_um``."""
        coords = np.stack([self._grid_coords(y_um, 0), self._grid_coords(x_um, 1)])
        return tuple(
            ndimage.map_coordinates(field, coords, order=1, mode="nearest").astype(np.float32)
            for field in (self.tissue_distance, self.tumour_distance)
        )

    def window(self, y_um: np.ndarray, x_um: np.ndarray) -> _GridWindow:
        """Bilinear sampling of the grids on the rows ``y_um`` x columns ``x_um`` of a region (µm)."""
        return _GridWindow(self._interpolation(y_um, 0), self._interpolation(x_um, 1))

    def _grid_coords(self, um: np.ndarray, axis: int) -> np.ndarray:
        return (np.asarray(um, dtype=np.float64) - self.origin_um[axis]) / self.cell_um - 0.5

    def _interpolation(self, um: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower neighbour index and weight of the upper one, clamped to the grid."""
        size = self.tissue_distance.shape[axis]
        coords = np.clip(self._grid_coords(um, axis), 0, size - 1)
        lower = np.minimum(np.floor(coords).astype(np.intp), size - 2)
        return lower, (coords - lower).astype(np.float32)


class _GridWindow:
    """A layout grid's values on the pixels of one region, from the few cells that region spans."""

    def __init__(self, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]):
        (self.iy, self.fy), (self.ix, self.fx) = rows, cols
        self.cells = (
            slice(int(self.iy.min()), int(self.iy.max()) + 2),
            slice(int(self.ix.min()), int(self.ix.max()) + 2),
        )

    def bounds(self, field: np.ndarray) -> tuple[float, float]:
        """Lowest and highest value over the region: bilinear interpolation stays within its cells' values."""
        cells = field[self.cells]
        return float(cells.min()), float(cells.max())

    def sample(self, field: np.ndarray) -> np.ndarray:
        """(H, W) float32."""
        # Rows first, on the few columns the region spans; then the columns of every pixel.
        c0 = self.cells[1].start
        band = (
            field[self.iy, self.cells[1]] * (1 - self.fy)[:, None]
            + field[self.iy + 1, self.cells[1]] * self.fy[:, None]
        )
        jx = self.ix - c0
        return band[:, jx] * (1 - self.fx) + band[:, jx + 1] * self.fx


def random_slide_layout(
    rng: np.random.Generator,
    height_um: float,
    width_um: float,
    *,
    tissue_fraction: float = 0.5,
    tumour_fraction: float = 0.35,
) -> TissueLayout:
    """A few irregular tissue pieces kept off the slide's border, with tumour regions inside them.

    ``tissue_fraction`` of the slide is tissue, and ``tumour_fraction`` of the tissue is tumour (both up
    to the grid's resolution). Blob sizes scale with the slide, so small test slides get both classes.
    """
    shape = (max(2, math.ceil(height_um / FIELD_MPP)), max(2, math.ceil(width_um / FIELD_MPP)))
    side = min(shape)
    blobs = _smooth_noise(rng, shape, sigma=max(1.5, side / 7))
    # Tissue is cut out of a glass slide: push the score down near the border so pieces stay inside.
    border = np.minimum.outer(_distance_to_ends(shape[0]), _distance_to_ends(shape[1])) / side
    blobs -= 4.0 * np.clip(1 - border / 0.12, 0, 1)
    tissue = blobs > np.quantile(blobs, 1 - tissue_fraction)
    spots = _smooth_noise(rng, shape, sigma=max(1.0, side / 14))
    tumour = tissue & (spots > np.quantile(spots[tissue], 1 - tumour_fraction))
    return TissueLayout(tissue_distance=_signed_distance(tissue), tumour_distance=_signed_distance(tumour))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (noise - noise.mean()) / (noise.std() + 1e-12)


def _distance_to_ends(n: int) -> np.ndarray:
    """Cells from either end of a row of ``n`` cells, counting cell centres."""
    i = np.arange(n) + 0.5
    return np.minimum(i, n - i)


def _signed_distance(mask: np.ndarray, cell_um: float = FIELD_MPP) -> np.ndarray:
    """µm from each cell centre to the mask's edge: positive inside, negative outside; (rows, cols) float32."""
    if mask.all() or not mask.any():
        return np.full(mask.shape, _FAR_INSIDE_UM if mask.all() else -_FAR_INSIDE_UM, np.float32)
    # The edge runs half a cell beyond the last cell centre on either side.
    inside = ndimage.distance_transform_edt(mask) - 0.5
    outside = ndimage.distance_transform_edt(~mask) - 0.5
    return (np.where(mask, inside, -outside) * cell_um).astype(np.float32)


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class _StampBank:
    """Nuclei of one kind rasterised at one mpp, kept sparse: only the pixels they cover.

    Stamp ``i``'s pixels are ``dy, dx, value[starts[i] : starts[i] + counts[i]]``, offsets in pixels from
    the pixel its nucleus is centred on; ``value`` is haematoxylin concentration, 1 = densest chromatin.
    """

    dy: np.ndarray  # int32
    dx: np.ndarray  # int32
    value: np.ndarray  # float32
    starts: np.ndarray  # (n,) int64
    counts: np.ndarray  # (n,) int64


class TissueTextures:
    """What stays the same across a slide's tiles: nucleus stamp banks and periodic textures.

    Built lazily from ``seed``, per mpp; one instance can serve many canvases (the training tiles share one).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.stamps = lru_cache(maxsize=64)(self._stamps)
        self.fibres = lru_cache(maxsize=16)(self._fibres)
        self.noise = lru_cache(maxsize=1)(self._noise)

    def _stamps(self, kind: NucleusKind, mpp: float) -> _StampBank:
        """``_STAMPS_PER_KIND`` nuclei of ``kind`` rasterised at ``mpp``.

        The shapes (the same at every mpp) come from (seed, kind); pixels are averaged over subsamples so
        that nuclei smaller than a pixel at coarse mpp still add their area's worth.
        """
        shape = _NUCLEUS_SHAPES[kind]
        rng = np.random.default_rng([self.seed, 1, int(kind)])
        n = _STAMPS_PER_KIND
        radius = rng.uniform(*shape.radius_um, n)
        elongation = rng.uniform(*shape.elongation, n)
        major, minor = radius * np.sqrt(elongation), radius / np.sqrt(elongation)
        angle = rng.uniform(0, np.pi, n)
        harmonics = rng.normal(0, shape.irregularity / 2, (n, 4)) * (rng.random((n, 1)) < 0.8)
        phases = rng.uniform(0, 2 * np.pi, (n, 4))

        sub = int(np.clip(round(mpp / 0.25), 1, 8))  # subsamples per pixel side
        half = math.ceil(major.max() * (1 + 2 * shape.irregularity) / mpp) + 1
        size = 2 * half + 1
        offsets = ((np.arange(size * sub) + 0.5) / sub - 0.5 - half) * mpp  # µm from the centre pixel's centre
        y, x = np.meshgrid(offsets, offsets, indexing="ij")
        fine_um = mpp / sub
        dy, dx, value, counts = [], [], [], []
        for i in range(n):
            u = x * np.cos(angle[i]) + y * np.sin(angle[i])
            v = -x * np.sin(angle[i]) + y * np.cos(angle[i])
            rho = np.hypot(u / major[i], v / minor[i])
            phi = np.arctan2(v / minor[i], u / major[i])
            outline = 1 + sum(harmonics[i, k] * np.cos((k + 2) * phi + phases[i, k]) for k in range(4))
            # A soft edge ~0.4 µm wide, in µm along the minor axis.
            inside = 1 / (1 + np.exp(-(outline - rho) * minor[i] / 0.4))
            chromatin = ndimage.gaussian_filter(rng.standard_normal(rho.shape), 0.6 / fine_um, mode="wrap")
            chromatin /= chromatin.std() + 1e-12
            density = inside * np.clip(1 + shape.chromatin * 0.5 * chromatin, 0.3, 1.6)
            stamp = density.reshape(size, sub, size, sub).mean(axis=(1, 3))
            rows, cols = np.nonzero(stamp > 0.01)
            dy.append(rows - half)
            dx.append(cols - half)
            value.append(stamp[rows, cols])
            counts.append(rows.size)
        counts = np.asarray(counts, np.int64)
        return _StampBank(
            dy=np.concatenate(dy).astype(np.int32),
            dx=np.concatenate(dx).astype(np.int32),
            value=np.concatenate(value).astype(np.float32),
            starts=np.cumsum(counts) - counts,
            counts=counts,
        )

    def _fibres(self, mpp: float) -> np.ndarray:
        """Collagen fibre texture at ``mpp``: (P, P) float32 in [0, 1], periodic; 0.5 where fibres blur away.

        Band-limited noise whose spectrum is long along a few random directions (fibres ~1.5 µm thick and
        ~15 µm long), plus a slow variation between loose and dense stroma (~40 µm).
        """
        rng = np.random.default_rng([self.seed, 2])
        period = _FIBRE_PERIOD_PX
        fy = np.fft.fftfreq(period, d=mpp)[:, None]  # cycles per µm
        fx = np.fft.rfftfreq(period, d=mpp)[None, :]
        spectrum = np.zeros((period, period // 2 + 1))
        for angle in rng.uniform(0, np.pi, 5):
            along = fx * np.cos(angle) + fy * np.sin(angle)
            across = -fx * np.sin(angle) + fy * np.cos(angle)
            spectrum += np.exp(-0.5 * ((along * 2 * np.pi * 15) ** 2 + (across * 2 * np.pi * 1.5) ** 2))
        slow = np.exp(-0.5 * (np.hypot(fx, fy) * 2 * np.pi * 40) ** 2)
        white = np.fft.rfft2(rng.standard_normal((period, period)))
        texture = np.zeros((period, period))
        for filtered, weight in ((white * spectrum, 0.28), (white * slow, 0.15)):
            # Relative to white noise's std (1): at coarse mpp a part blurs to nothing and is left out.
            part = np.fft.irfft2(filtered, s=(period, period))
            if part.std() > 1e-3:
                texture += weight * (part - part.mean()) / part.std()
        return np.clip(0.5 + texture, 0, 1).astype(np.float32)

    def _noise(self) -> np.ndarray:
        """Scanner noise, as a shift of the colour-table index: (Q, Q) float32, periodic, the same at every mpp."""
        noise = np.random.default_rng([self.seed, 3]).normal(0.0, _NOISE_STEPS, (_NOISE_PERIOD_PX,) * 2)
        # Plus the half step that turns the table index's truncation into rounding.
        return (noise + 0.5).astype(np.float32)


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class _Block:
    """The nuclei and glands of one block, in slide µm."""

    nucleus_y: np.ndarray  # (n,) float32
    nucleus_x: np.ndarray  # (n,) float32
    kind: np.ndarray  # (n,) int8 NucleusKind
    stamp: np.ndarray  # (n,) int16 index into the kind's stamp bank
    darkness: np.ndarray  # (n,) float32 haematoxylin concentration at the stamp's densest
    glands: np.ndarray  # (g, 6) float32: centre y, centre x, semi-axes a and b, angle, lumen fraction


class SlideCanvas:
    """A slide's tissue, laid out in µm, that renders any region at any mpp.

    ``layout`` says where tissue and tumour are; ``style`` how it is stained; nuclei and glands come from
    ``seed`` block by block; ``textures`` can be shared between canvases (default: built from ``seed``).
    """

    def __init__(
        self,
        layout: TissueLayout,
        *,
        seed: int,
        style: StainStyle = REFERENCE_STAIN,
        textures: TissueTextures | None = None,
        cached_blocks: int = 4096,
    ):
        self.layout = layout
        self.seed = seed
        self.style = style
        self.textures = textures or TissueTextures(seed)
        self.block = lru_cache(maxsize=cached_blocks)(self._block)
        self._colours = _colour_table(style)

    def ground_truth(self) -> GroundTruth:
        return self.layout.ground_truth()

    def render(self, top: int, left: int, height: int, width: int, mpp: float) -> np.ndarray:
        """The region of ``height`` x ``width`` pixels whose top-left pixel is (``top``, ``left``) on the grid
        of ``mpp`` pixels starting at the slide's origin: (height, width, 3) uint8 RGB."""
        style = self.style
        y_um = ((top + np.arange(height) + 0.5) * mpp).astype(np.float32)
        x_um = ((left + np.arange(width) + 0.5) * mpp).astype(np.float32)
        window = self.layout.window(y_um, x_um)
        fibres = _periodic_window(self.textures.fibres(mpp), top, left, height, width)

        # Each is a float where the whole region lies on one side of an edge: most regions are all glass,
        # all stroma or all tumour, and skip that arithmetic.
        tissue = _inside_fraction(window, self.layout.tissue_distance, ragged_by=fibres)
        tumour = _inside_fraction(window, self.layout.tumour_distance) * tissue
        normal = tissue - tumour
        stroma_eosin = fibres * (1.4 * style.stroma_eosin)
        stroma_eosin += 0.3 * style.stroma_eosin
        eosin = _weighted(normal, stroma_eosin) + tumour * style.tumour_eosin
        haematoxylin = normal * style.stroma_haematoxylin + tumour * style.tumour_haematoxylin

        nuclei, glands = self._contents(top, left, height, width, mpp)
        lining, lumen = _gland_maps(glands, top, left, height, width, mpp)
        if lining is not None:
            lining *= tissue
            eosin = eosin + lining * (style.epithelium_eosin - eosin)
            eosin *= 1 - 0.92 * lumen
            haematoxylin = haematoxylin + 0.06 * (lining - lumen * tissue)
        haematoxylin = self._nuclear_density(nuclei, top, left, height, width, mpp) + haematoxylin
        noise = _periodic_window(self.textures.noise(), top, left, height, width)
        index = _colour_index(haematoxylin, np.broadcast_to(eosin, (height, width)), noise)
        rgba = self._colours.take(index).view(np.uint8).reshape(height, width, 4)
        rgb = np.empty((height, width, 3), np.uint8)
        for channel in range(3):  # channel by channel: several times faster than one strided copy
            rgb[..., channel] = rgba[..., channel]
        return rgb

    def _contents(self, top: int, left: int, height: int, width: int, mpp: float) -> tuple[_Block, np.ndarray]:
        """The nuclei reaching into a region, and the glands of the blocks it overlaps."""
        y0, y1 = top * mpp - _NUCLEUS_MARGIN_UM, (top + height) * mpp + _NUCLEUS_MARGIN_UM
        x0, x1 = left * mpp - _NUCLEUS_MARGIN_UM, (left + width) * mpp + _NUCLEUS_MARGIN_UM
        blocks = [
            self.block(by, bx)
            for by in range(math.floor(y0 / BLOCK_UM), math.floor(y1 / BLOCK_UM) + 1)
            for bx in range(math.floor(x0 / BLOCK_UM), math.floor(x1 / BLOCK_UM) + 1)
        ]
        nuclei = _Block(
            *(np.concatenate([getattr(b, f) for b in blocks]) for f in ("nucleus_y", "nucleus_x", "kind", "stamp")),
            darkness=np.concatenate([b.darkness for b in blocks]),
            glands=np.empty((0, 6), np.float32),
        )
        return nuclei, np.concatenate([b.glands for b in blocks])

    def _block(self, by: int, bx: int) -> _Block:
        """Nuclei and glands of the block at row ``by``, column ``bx``: a pure function of (seed, by, bx)."""
        rng = np.random.default_rng([self.seed, by % 2**32, bx % 2**32])
        glands = self._block_glands(rng, by, bx)

        # Candidate nuclei on a jittered grid: crowded where kept densely, evenly spread where sparse.
        n = round(BLOCK_UM / _NUCLEUS_GRID_UM)
        gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        y = (by * BLOCK_UM + (gy.ravel() + 0.5 + rng.uniform(-0.45, 0.45, n * n)) * (BLOCK_UM / n)).astype(np.float32)
        x = (bx * BLOCK_UM + (gx.ravel() + 0.5 + rng.uniform(-0.45, 0.45, n * n)) * (BLOCK_UM / n)).astype(np.float32)
        tissue_d, tumour_d = self.layout.distances_at(y, x)
        draw = rng.random(n * n)
        kind = np.full(n * n, -1, np.int8)
        in_tumour = (tissue_d > 0) & (tumour_d > 0)
        in_normal = (tissue_d > 0) & ~in_tumour & ~_inside_glands(glands, y, x)
        kind[in_tumour & (draw < 0.90)] = NucleusKind.TUMOUR
        kind[in_tumour & (draw >= 0.97)] = NucleusKind.LYMPHOCYTE
        kind[in_normal & (draw < 0.05)] = NucleusKind.FIBROBLAST
        kind[in_normal & (draw >= 0.05) & (draw < 0.07)] = NucleusKind.LYMPHOCYTE
        kept = kind >= 0
        lining_y, lining_x = _gland_lining_nuclei(rng, glands)
        y = np.concatenate([y[kept], lining_y])
        x = np.concatenate([x[kept], lining_x])
        kind = np.concatenate([kind[kept], np.full(lining_y.size, NucleusKind.EPITHELIAL, np.int8)])

        darkness = np.empty(kind.size, np.float32)
        for k in NucleusKind:
            of_kind = kind == k
            darkness[of_kind] = rng.uniform(*_NUCLEUS_SHAPES[k].darkness, int(of_kind.sum()))
        stamp = rng.integers(0, _STAMPS_PER_KIND, kind.size).astype(np.int16)
        return _Block(y, x, kind, stamp, darkness, glands)

    def _block_glands(self, rng: np.random.Generator, by: int, bx: int) -> np.ndarray:
        """Glands of a block, at most one per gland cell and wholly inside it, only in normal tissue."""
        per_side = round(BLOCK_UM / _GLAND_CELL_UM)
        cells = per_side * per_side
        a = rng.uniform(20, 48, cells)
        b = a * rng.uniform(0.6, 1.0, cells)
        slack = _GLAND_CELL_UM / 2 - a - 4  # how far the centre may move and keep the gland in its cell
        cy = by * BLOCK_UM + (np.arange(cells) // per_side + 0.5) * _GLAND_CELL_UM + rng.uniform(-1, 1, cells) * slack
        cx = bx * BLOCK_UM + (np.arange(cells) % per_side + 0.5) * _GLAND_CELL_UM + rng.uniform(-1, 1, cells) * slack
        angle = rng.uniform(0, np.pi, cells)
        lumen = rng.uniform(0.35, 0.6, cells)
        present = rng.random(cells) < 0.6
        tissue_d, tumour_d = self.layout.distances_at(cy, cx)
        inside_normal = (tissue_d > a + 16) & (tumour_d < -(a + 16))
        glands = np.stack([cy, cx, a, b, angle, lumen], axis=1)[present & inside_normal]
        return glands.astype(np.float32)

    def _nuclear_density(self, nuclei: _Block, top: int, left: int, height: int, width: int, mpp: float) -> np.ndarray:
        """Haematoxylin of the nuclei on a region: every stamp added where it lands; (height, width) float32."""
        flat_index, weight = [], []
        for kind in NucleusKind:
            of_kind = nuclei.kind == kind
            if not of_kind.any():
                continue
            bank = self.textures.stamps(kind, mpp)
            reach = int(max(np.abs(bank.dy).max(), np.abs(bank.dx).max()))
            row = np.rint(nuclei.nucleus_y[of_kind] / mpp - 0.5).astype(np.intp) - top
            col = np.rint(nuclei.nucleus_x[of_kind] / mpp - 0.5).astype(np.intp) - left
            near = (row >= -reach) & (row < height + reach) & (col >= -reach) & (col < width + reach)
            if not near.any():
                continue
            stamp = nuclei.stamp[of_kind][near]
            counts = bank.counts[stamp]
            # Each nucleus's run of its stamp's pixels, all nuclei at once.
            source = np.repeat(bank.starts[stamp] - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
            rows = np.repeat(row[near], counts) + bank.dy[source]
            cols = np.repeat(col[near], counts) + bank.dx[source]
            on = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            flat_index.append((rows * width + cols)[on])
            weight.append((bank.value[source] * np.repeat(nuclei.darkness[of_kind][near], counts))[on])
        if not flat_index:
            return np.zeros((height, width), np.float32)
        density = np.bincount(np.concatenate(flat_index), np.concatenate(weight), minlength=height * width)
        return density.reshape(height, width).astype(np.float32)


def _inside_fraction(
    window: _GridWindow, distance: np.ndarray, ragged_by: np.ndarray | None = None
) -> float | np.ndarray:
    """How much of each pixel lies inside the region whose signed distance is ``distance``: (H, W) float32 in
    [0, 1], or a float where the whole window is on one side of the edge. ``ragged_by`` (fibres, [0, 1]) moves
    the edge by up to ``_RAGGED_UM`` either way."""
    reach = _EDGE_UM + (_RAGGED_UM if ragged_by is not None else 0.0)
    low, high = window.bounds(distance)
    if low >= reach:
        return 1.0
    if high <= -reach:
        return 0.0
    d = window.sample(distance)
    if ragged_by is not None:
        d += (2 * _RAGGED_UM) * (ragged_by - 0.5)
    d *= 1 / (2 * _EDGE_UM)
    d += 0.5
    return np.clip(d, 0, 1, out=d)


def _weighted(weight: float | np.ndarray, values: np.ndarray) -> float | np.ndarray:
    """``weight * values``, skipping the arithmetic where the weight is a plain 0 or 1."""
    if isinstance(weight, float) and weight in (0.0, 1.0):
        return values if weight else 0.0
    return weight * values


def _colour_table(style: StainStyle) -> np.ndarray:
    """RGB of every (haematoxylin, eosin) pair on the quantised grid, packed as little-endian RGBA:
    (H_LEVELS * E_LEVELS,) uint32.

    Colour depends on the two concentrations alone, so a table lookup replaces a per-pixel exp and three
    channels of arithmetic, the bulk of the rendering time; one uint32 per colour, because ``take`` on
    a flat table is several times faster than gathering rows of three bytes.
    """
    haematoxylin = (np.arange(_H_LEVELS) - _BELOW_ZERO_STEPS) / _STEPS_PER_OD
    eosin = (np.arange(_E_LEVELS) - _BELOW_ZERO_STEPS) / _STEPS_PER_OD
    od = (
        haematoxylin[:, None, None] * np.asarray(style.haematoxylin_od)
        + eosin[None, :, None] * np.asarray(style.eosin_od)
        + np.asarray(style.glass_od)
    )
    rgba = np.full((*od.shape[:2], 4), 255, np.uint8)
    rgba[..., :3] = np.clip(np.rint(255 * np.exp(-od)), 0, 255)
    return rgba.reshape(-1, 4).view("<u4").ravel()


def _colour_index(haematoxylin: np.ndarray, eosin: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Index into ``_colour_table`` of each pixel's concentrations, ``noise`` (in table steps) added: (H, W) int32."""
    index = np.empty(haematoxylin.shape, np.int32)
    for concentration, levels, scale in ((haematoxylin, _H_LEVELS, _E_LEVELS), (eosin, _E_LEVELS, 1)):
        steps = concentration * float(_STEPS_PER_OD)
        steps += noise
        steps += _BELOW_ZERO_STEPS
        np.clip(steps, 0, levels - 1, out=steps)
        if scale == 1:
            index += steps.astype(np.int32)
        else:
            np.multiply(steps.astype(np.int32), scale, out=index)
    return index


def _inside_glands(glands: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which points (µm) lie within a gland, or just around it."""
    inside = np.zeros(y.shape, bool)
    for cy, cx, a, b, angle, _ in glands:
        inside |= _gland_radius(y - cy, x - cx, a, b, angle) < 1.15
    return inside


def _gland_radius(dy: np.ndarray, dx: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    """Elliptical radius: 1 on the gland's outline."""
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return np.hypot(u / a, v / b)


def _gland_lining_nuclei(rng: np.random.Generator, glands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Epithelial nuclei evenly around each gland, near its outer (basal) edge: y and x in µm, float32."""
    ys, xs = [np.empty(0, np.float32)], [np.empty(0, np.float32)]
    for cy, cx, a, b, angle, _ in glands:
        radius = 0.8
        perimeter = np.pi * (a + b) * radius
        count = max(8, round(perimeter / 6.5))
        phi = (np.arange(count) + rng.uniform(-0.15, 0.15, count)) * (2 * np.pi / count)
        r = radius + rng.uniform(-0.03, 0.03, count)
        u, v = a * r * np.cos(phi), b * r * np.sin(phi)
        ys.append((cy + u * np.sin(angle) + v * np.cos(angle)).astype(np.float32))
        xs.append((cx + u * np.cos(angle) - v * np.sin(angle)).astype(np.float32))
    return np.concatenate(ys), np.concatenate(xs)


def _gland_maps(
    glands: np.ndarray, top: int, left: int, height: int, width: int, mpp: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """How much of each pixel is gland (lining and lumen) and how much lumen: (height, width) float32 each,
    or (None, None) where no gland reaches the region."""
    lining = lumen = None
    soft_um = max(1.0, mpp)
    for cy, cx, a, b, angle, lumen_fraction in glands:
        r0 = max(0, math.floor((cy - a) / mpp) - top - 1)
        r1 = min(height, math.ceil((cy + a) / mpp) - top + 2)
        c0 = max(0, math.floor((cx - a) / mpp) - left - 1)
        c1 = min(width, math.ceil((cx + a) / mpp) - left + 2)
        if r0 >= r1 or c0 >= c1:
            continue
        if lining is None:
            lining = np.zeros((height, width), np.float32)
            lumen = np.zeros((height, width), np.float32)
        dy = ((top + np.arange(r0, r1) + 0.5) * mpp - cy)[:, None]
        dx = ((left + np.arange(c0, c1) + 0.5) * mpp - cx)[None, :]
        rho = _gland_radius(dy, dx, a, b, angle)
        scale = b / soft_um  # radius units per soft-edge width
        np.maximum(lining[r0:r1, c0:c1], np.clip(0.5 + (1 - rho) * scale, 0, 1), out=lining[r0:r1, c0:c1])
        np.maximum(lumen[r0:r1, c0:c1], np.clip(0.5 + (lumen_fraction - rho) * scale, 0, 1), out=lumen[r0:r1, c0:c1])
    return lining, lumen


def _periodic_window(texture: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """The (height, width) window at (top, left) of a texture repeated over the plane."""
    rows = (top + np.arange(height)) % texture.shape[0]
    cols = (left + np.arange(width)) % texture.shape[1]
    return texture.take(rows, axis=0).take(cols, axis=1)


def make_slide_canvas(
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    tissue_fraction: float = 0.5,
    tumour_fraction: float = 0.35,
    stain_jitter: float = 0.5,
) -> SlideCanvas:
    """A whole slide of ``width`` x ``height`` pixels at ``mpp``: tissue pieces with tumour regions.

    Its ``ground_truth()`` labels ``FIELD_MPP`` cells (0 glass, 1 normal, 2 tumour); its ``render`` draws
    any region, at this or any other mpp (a pyramid level, a thumbnail).
    """
    rng = np.random.default_rng([seed, 0])
    layout = random_slide_layout(
        rng, height * mpp, width * mpp, tissue_fraction=tissue_fraction, tumour_fraction=tumour_fraction
    )
    return SlideCanvas(layout, seed=seed, style=random_stain_style(rng, stain_jitter))


def make_training_tiles(count: int, *, seed: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """Labelled tiles: (count, size, size, 3) uint8 RGB and (count,) int64 labels, 0 normal and 1 tumour.

    ``iter_training_tiles``'s tiles (its options: size, mpp, tumour_share, edge_share, stain_jitter) in two
    arrays. Each tile is wholly one class, with its own staining; ``edge_share`` of them show the edge of the
    tissue with glass beyond. Everything, the nuclei stamps included, comes from ``seed``.
    """
    pairs = list(iter_training_tiles(count, seed=seed, **options))
    tiles = np.stack([tile for tile, _ in pairs]) if pairs else np.empty((0, 0, 0, 3), np.uint8)
    return tiles, np.array([label for _, label in pairs], np.int64)


def iter_training_tiles(
    count: int,
    *,
    seed: int,
    size: int = TRAINING_TILE_SIZE,
    mpp: float = TRAINING_MPP,
    tumour_share: float = 0.5,
    edge_share: float = 0.2,
    stain_jitter: float = 1.0,
) -> Iterator[tuple[np.ndarray, int]]:
    """Training tiles one at a time: (size, size, 3) uint8 RGB at ``mpp``, and its label (1 tumour)."""
    rng = np.random.default_rng([seed, 4])
    textures = TissueTextures(seed)
    side_um = size * mpp
    for _ in range(count):
        label = int(rng.random() < tumour_share)
        # Somewhere on a large virtual slide, so that blocks and textures differ from tile to tile.
        top = int(rng.integers(0, 100_000))
        left = int(rng.integers(0, 100_000))
        layout = _uniform_layout(rng, (top * mpp, left * mpp), side_um, label, edge=rng.random() < edge_share)
        canvas = SlideCanvas(
            layout,
            seed=int(rng.integers(2**31)),
            style=random_stain_style(rng, stain_jitter),
            textures=textures,
            cached_blocks=16,
        )
        yield canvas.render(top, left, size, size, mpp), label


def _uniform_layout(
    rng: np.random.Generator, corner_um: tuple[float, float], side_um: float, label: int, *, edge: bool
) -> TissueLayout:
    """One class all over the square of ``side_um`` at ``corner_um`` (y, x) and well around it; with ``edge``,
    tissue only on one side of a straight line through the square's middle third."""
    margin = 2 * BLOCK_UM  # nuclei and glands of neighbouring blocks are drawn against it too
    n = math.ceil((side_um + 2 * margin) / FIELD_MPP)
    origin = (corner_um[0] - margin, corner_um[1] - margin)
    tumour = np.full((n, n), _FAR_INSIDE_UM if label else -_FAR_INSIDE_UM, np.float32)
    tissue = np.full((n, n), _FAR_INSIDE_UM, np.float32)
    if edge:
        # A straight edge: its signed distance is linear, so bilinear interpolation keeps it exact.
        from_centre = (np.arange(n) + 0.5) * FIELD_MPP - margin - side_um / 2
        angle = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(-1, 1) * side_um / 6
        tissue = np.cos(angle) * from_centre[:, None] + np.sin(angle) * from_centre[None, :] - offset
        tissue = tissue.astype(np.float32)
    return TissueLayout(tissue_distance=tissue, tumour_distance=tumour, origin_um=origin)
