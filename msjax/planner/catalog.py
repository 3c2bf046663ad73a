"""Hardware catalog: what one GPU offers the performance model (memory, bandwidths, bf16 compute) and what it
costs. The defaults are the paper's Table 3 plus a few current GPUs; a user TOML file overrides prices or
adds entries:

    price_unit = "USD per GPU-hour (rental)"     # optional; the unit of every price below

    [gpu.H20]                                    # an existing entry: override any of its fields
    price = 1.4

    [gpu.MI300X]                                 # a new entry: every field but gpus_per_node is required
    memory_gb = 192
    memory_bw_gbs = 5300
    bf16_tflops = 1307
    network_gbps = 400
    intra_node_gbs = 896
    price = 4.0

Units: memory in GB (1e9 bytes), memory bandwidth in GB/s, compute in dense (no sparsity) bf16 TFLOP/s,
inter-node network in Gbit/s per GPU (the NICs of a server divided by its GPUs), intra-node (NVLink or PCIe)
in GB/s per GPU as spec sheets give it (both directions together).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from msjax.errors import ConfigError

NORMALIZED_PURCHASE = "normalized purchase price per GPU (L20 = 1.00)"


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU type as the performance model sees it."""

    name: str
    memory_gb: float  # C: HBM/GDDR capacity
    memory_bw_gbs: float  # memory bandwidth
    bf16_tflops: float  # dense bf16 tensor-core peak
    network_gbps: float  # W: inter-node bandwidth per GPU
    intra_node_gbs: float  # NVLink or PCIe bandwidth per GPU, both directions (spec-sheet number)
    price: float  # per GPU, in the catalog's price_unit
    gpus_per_node: int = 8  # M_a, M_e: the largest tensor-parallel group

    def __post_init__(self):
        for name in ("memory_gb", "memory_bw_gbs", "bf16_tflops", "network_gbps", "intra_node_gbs", "price"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"gpu.{self.name}.{name}", f"must be a positive number, got {value!r}")
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or \
                self.gpus_per_node < 1:
            raise ConfigError(f"gpu.{self.name}.gpus_per_node",
                              f"must be a positive integer, got {self.gpus_per_node!r}")

    # Per-second rates in SI units, for the model.
    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def memory_bytes_per_s(self) -> float:
        return self.memory_bw_gbs * 1e9

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def network_bytes_per_s(self) -> float:
        return self.network_gbps * 1e9 / 8

    @property
    def intra_node_bytes_per_s(self) -> float:
        """One direction: spec sheets add both directions of NVLink/PCIe."""
        return self.intra_node_gbs * 1e9 / 2


# Table 3 of the paper gives price (normalised by L20), capacity, memory bandwidth and dense bf16 compute for
# L20, H800, A800, H20 and L40S; those numbers are copied unchanged. The network and intra-node columns are not
# in Table 3: for A800, H20 and L40S they are the paper's testbeds (§7.1: eight 200 Gbps NICs per eight Ampere
# GPUs with 400 GB/s NVLink; H20 servers with 900 GB/s NVLink and four 400 Gbps NICs; L40S servers on PCIe with
# two 400 Gbps NICs, taken as eight GPUs per server), for the others they are common server configurations
# (assumptions).
#
# H100, H200, A100 and B200 come from NVIDIA's public spec sheets (SXM parts, dense bf16 = half the sparse
# figure): H100 SXM5 80 GB HBM3, 3.35 TB/s, 989 TFLOPS, NVLink 900 GB/s; H200 SXM 141 GB HBM3e, 4.8 TB/s,
# 989 TFLOPS, NVLink 900 GB/s; A100 SXM 80 GB, 2039 GB/s, 312 TFLOPS, NVLink 600 GB/s; B200 (HGX/DGX B200)
# 180 GB HBM3e, 8 TB/s, 2250 TFLOPS, NVLink 1.8 TB/s. Networks: DGX A100 has one 200 Gb/s HDR NIC per GPU;
# DGX H100/H200/B200 one 400 Gb/s ConnectX-7 per GPU.
#
# PRICES OF H100, H200, A100 AND B200 ARE ASSUMPTIONS, on Table 3's normalised purchase scale: A100 = A800
# (its export variant, same silicon), H100 = H800, H200 = 1.15 x H100, B200 = 1.6 x H100. Override them with
# real quotes or rental prices through a catalog file.
_DEFAULT_GPUS = (
    GpuSpec("L20", 48, 864, 119.5, network_gbps=100, intra_node_gbs=64, price=1.00),
    GpuSpec("H800", 80, 3430.4, 989, network_gbps=400, intra_node_gbs=400, price=5.28),
    GpuSpec("A800", 80, 2039, 312, network_gbps=200, intra_node_gbs=400, price=2.26),
    GpuSpec("H20", 96, 4096, 148, network_gbps=200, intra_node_gbs=900, price=1.85),
    GpuSpec("L40S", 48, 864, 362, network_gbps=100, intra_node_gbs=64, price=1.08),
    GpuSpec("H100", 80, 3350, 989, network_gbps=400, intra_node_gbs=900, price=5.28),
    GpuSpec("H200", 141, 4800, 989, network_gbps=400, intra_node_gbs=900, price=6.07),
    GpuSpec("A100", 80, 2039, 312, network_gbps=200, intra_node_gbs=600, price=2.26),
    GpuSpec("B200", 180, 8000, 2250, network_gbps=400, intra_node_gbs=1800, price=8.45),
)

_GPU_FIELDS = tuple(f.name for f in dataclasses.fields(GpuSpec) if f.name != "name")
_REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(GpuSpec)
                         if f.name != "name" and f.default is dataclasses.MISSING)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """GPU types by name, with the unit their prices are in."""

    gpus: tuple[GpuSpec, ...]
    price_unit: str = NORMALIZED_PURCHASE

    def __post_init__(self):
        names = [g.name for g in self.gpus]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError("gpu", f"listed twice: {', '.join(duplicates)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.gpus)

    def __getitem__(self, name: str) -> GpuSpec:
        for gpu in self.gpus:
            if gpu.name == name:
                return gpu
        raise ConfigError("gpus", f"unknown GPU {name!r}; the catalog has {', '.join(self.names)}")

    def with_price(self, name: str, price: float) -> "Catalog":
        return self.with_entry(dataclasses.replace(self[name], price=price))

    def with_entry(self, gpu: GpuSpec) -> "Catalog":
        """This catalog with `gpu` added, or replacing the entry of the same name."""
        kept = tuple(g for g in self.gpus if g.name != gpu.name)
        if len(kept) == len(self.gpus):
            return dataclasses.replace(self, gpus=self.gpus + (gpu,))
        return dataclasses.replace(self, gpus=tuple(gpu if g.name == gpu.name else g for g in self.gpus))

    def with_overrides(self, path: str | Path) -> "Catalog":
        """This catalog updated from a TOML file (format in the module docstring)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as err:
            raise ConfigError("catalog", f"cannot read {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("catalog", f"{path} is not valid TOML ({err})") from None
        unknown = sorted(set(data) - {"price_unit", "gpu"})
        if unknown:
            raise ConfigError(unknown[0], f"unknown key in {path}; expected price_unit and [gpu.NAME] tables")
        catalog = self
        if "price_unit" in data:
            if not isinstance(data["price_unit"], str) or not data["price_unit"].strip():
                raise ConfigError("price_unit", f"must be a non-empty string, got {data['price_unit']!r}")
            catalog = dataclasses.replace(catalog, price_unit=data["price_unit"])
        gpus = data.get("gpu", {})
        if not isinstance(gpus, dict):
            raise ConfigError("gpu", f"must be tables [gpu.NAME], got {gpus!r}")
        for name, fields in gpus.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"gpu.{name}", f"must be a table of fields, got {fields!r}")
            unknown = sorted(set(fields) - set(_GPU_FIELDS))
            if unknown:
                raise ConfigError(f"gpu.{name}.{unknown[0]}", f"unknown field; known: {', '.join(_GPU_FIELDS)}")
            if name in catalog.names:
                catalog = catalog.with_entry(dataclasses.replace(catalog[name], **fields))
            else:
                missing = [f for f in _REQUIRED_FIELDS if f not in fields]
                if missing:
                    raise ConfigError(f"gpu.{name}", f"a new GPU needs {', '.join(missing)}")
                catalog = catalog.with_entry(GpuSpec(name=name, **fields))
        return catalog


def default_catalog() -> Catalog:
    return Catalog(_DEFAULT_GPUS)


def load_catalog(path: str | Path | None) -> Catalog:
    """The default catalog, updated from `path` when one is given."""
    catalog = default_catalog()
    return catalog if path is None else catalog.with_overrides(path)
