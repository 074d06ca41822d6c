"""Manifest v0: what to serve and how, one YAML file loaded into frozen dataclasses.

    version: 0
    model:     {checkpoint: PATH} or {preset: NAME, seed: INT}, dtype, simulate_quant, device
    backend:   inprocess | ray
    instance:  workers (expert-parallel workers per instance), communicator, num_cpus, num_gpus,
               resources (custom Ray resources per worker), placement, context_parallel_min_tokens
               (prefill chunks this long are split over the workers; 0 = off)
    pools:     {NAME: {role, instances, <the instance keys>}}; instead of `instance` when a
               topology has several instances or prefill/decode pools (role colocated |
               prefill | decode; a pool named after a role takes that role)
    ray:       address
    scheduler: max_batch_tokens, max_running, max_waiting, max_model_len,
               kv_cache_bytes or kv_cache_gib, page_size, prefix_cache, handoff_failure,
               handoff_timeout_s, handoff_transport, health_check_s
    gateway:   host, port, metrics_port, http_port, strict_output_format, default_thinking,
               served_model_name, max_request_bytes, max_prompt_tokens, tls {cert, key}

Every key is optional (see the defaults below). Unknown keys and bad values are
`ManifestError`s that carry the key path, e.g. ``scheduler.max_batch_tokens: must be
>= 1, got 0``. Each field's parser lives in its `metadata`, so a new section is a new
dataclass and a line in `Manifest`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.backends import BACKENDS as _BACKEND_BUILDERS
from router.names import COMMUNICATORS
from workers.presets import PRESETS

BACKENDS = tuple(_BACKEND_BUILDERS)  # inprocess | ray
PLACEMENTS = ("pack", "spread")
DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
TRANSPORTS = ("auto", "object_store", "collective")
ROLES = ("colocated", "prefill", "decode")
MANIFEST_VERSIONS = (0,)


class ManifestError(ValueError):
    """A manifest that cannot be served; `path` is the key path of the culprit."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


Parser = Callable[[Any, str], Any]


def _int(minimum: int | None = None, maximum: int | None = None, optional: bool = False) -> dict[str, Parser]:
    def parse(value: Any, path: str) -> int | None:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ManifestError(path, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ManifestError(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ManifestError(path, f"must be <= {maximum}, got {value}")
        return value

    return {"parse": parse}


def _positive_float(optional: bool = False) -> dict[str, Parser]:
    def parse(value: Any, path: str) -> float | None:
        if value is None and optional:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ManifestError(path, f"must be a number, got {value!r}")
        if not value > 0:
            raise ManifestError(path, f"must be > 0, got {value}")
        return float(value)

    return {"parse": parse}


def _choice(choices: tuple[Any, ...], optional: bool = False) -> dict[str, Parser]:
    def parse(value: Any, path: str) -> Any:
        if value is None and optional:
            return None
        if value not in choices:
            raise ManifestError(path, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    return {"parse": parse}


def _nonnegative_float() -> dict[str, Parser]:
    def parse(value: Any, path: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ManifestError(path, f"must be a number >= 0, got {value!r}")
        return float(value)

    return {"parse": parse}


def _str(optional: bool = False) -> dict[str, Parser]:
    def parse(value: Any, path: str) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ManifestError(path, f"must be a non-empty string, got {value!r}")
        return value

    return {"parse": parse}


def _bool() -> dict[str, Parser]:
    def parse(value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise ManifestError(path, f"must be true or false, got {value!r}")
        return value

    return {"parse": parse}


def _section(cls: type) -> dict[str, Parser]:
    return {"parse": lambda value, path: parse_section(cls, value, path)}


def _optional_section(cls: type) -> dict[str, Parser]:
    return {"parse": lambda value, path: None if value is None else parse_section(cls, value, path)}


def _resources() -> dict[str, Parser]:
    """Custom Ray resources per worker: {name: amount > 0}."""

    def parse(value: Any, path: str) -> tuple[tuple[str, float], ...]:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise ManifestError(path, f"must be a mapping of resource name to amount, got {value!r}")
        out = []
        for name, amount in value.items():
            if not isinstance(name, str) or not name:
                raise ManifestError(path, f"resource names must be non-empty strings, got {name!r}")
            if name in ("CPU", "GPU", "memory"):
                raise ManifestError(f"{path}.{name}", "use num_cpus / num_gpus for CPUs and GPUs")
            out.append((name, _positive_float()["parse"](amount, f"{path}.{name}")))
        return tuple(out)

    return {"parse": parse}


def _pools() -> dict[str, Parser]:
    def parse(value: Any, path: str) -> tuple[PoolSpec, ...] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ManifestError(path, f"must be a non-empty mapping of pool name to pool, got {value!r}")
        pools = []
        for name, raw in value.items():
            sub = f"{path}.{name}"
            if not isinstance(name, str) or not name:
                raise ManifestError(path, f"pool names must be non-empty strings, got {name!r}")
            raw = dict(raw or {}) if isinstance(raw, Mapping) else raw
            if isinstance(raw, dict):
                raw.setdefault("role", name if name in ROLES else None)
                if raw["role"] is None:
                    raise ManifestError(f"{sub}.role", f"missing; one of {', '.join(ROLES)}")
            pools.append(dataclasses.replace(parse_section(PoolSpec, raw, sub), name=name))
        roles = [p.role for p in pools]
        if "colocated" in roles and len(pools) > 1:
            raise ManifestError(path, "a colocated pool serves alone; give one colocated pool or prefill + decode")
        for role in ("prefill", "decode"):
            if roles.count(role) > 1:
                raise ManifestError(path, f"more than one {role} pool; use `instances` to scale one pool")
        if ("prefill" in roles) != ("decode" in roles):
            raise ManifestError(path, "prefill and decode pools come together")
        return tuple(pools)

    return {"parse": parse}


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str | None = field(default=None, metadata=_str(optional=True))  # a checkpoint directory
    preset: str | None = field(default=None, metadata=_choice(tuple(PRESETS), optional=True))  # or a random model
    seed: int | None = field(default=None, metadata=_int(0, optional=True))  # of the preset's weights (default 0)
    dtype: str = field(default="auto", metadata=_choice(DTYPES))  # compute dtype; auto: bf16 if the CPU has it
    simulate_quant: bool = field(default=True, metadata=_bool())  # the official FP8/FP4 KV rounding
    device: str = field(default="auto", metadata=_choice(DEVICES))  # auto: each worker's GPU if it sees one

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.preset is not None:
            raise ManifestError("model", "give checkpoint or preset, not both")
        if self.checkpoint is not None and self.seed is not None:
            raise ManifestError("model.seed", "applies to a preset only, not to a checkpoint")

    @property
    def source(self) -> str:
        """The checkpoint path, or the preset with its seed (tiny-seed0); tiny when neither is given."""
        return self.checkpoint or f"{self.preset or 'tiny'}-seed{self.seed or 0}"


@dataclass(frozen=True)
class SchedulerSpec:
    max_batch_tokens: int = field(default=512, metadata=_int(1))  # tokens per step (prefill chunks + decodes)
    max_running: int = field(default=64, metadata=_int(1))  # requests in the running batch
    max_waiting: int = field(default=1024, metadata=_int(1))  # queued requests before RESOURCE_EXHAUSTED
    max_model_len: int = field(default=1048576, metadata=_int(2))  # prompt + completion tokens (capped by the model)
    kv_cache_bytes: int | None = field(default=None, metadata=_int(1, optional=True))  # KV cache per worker ...
    kv_cache_gib: float | None = field(default=None, metadata=_positive_float(optional=True))  # ... or in GiB
    page_size: int = field(default=128, metadata=_int(1))  # raw tokens per KV page (a multiple of 128)
    prefix_cache: bool = field(default=True, metadata=_bool())  # reuse states of shared prompt prefixes
    handoff_failure: str = field(default="recompute", metadata=_choice(("recompute", "fail")))  # state lost
    handoff_timeout_s: float = field(default=30.0, metadata=_positive_float())  # KV export from a Ray worker, at most
    # how a handed-off state travels between Ray workers: the object store, or pulled over a group of two
    # (nccl between GPUs, gloo on CPU); auto: collective where both pools use nccl
    handoff_transport: str = field(default="auto", metadata=_choice(TRANSPORTS))
    health_check_s: float = field(default=5.0, metadata=_positive_float())  # idle: ping the workers this often

    def __post_init__(self) -> None:
        if self.kv_cache_bytes is not None and self.kv_cache_gib is not None:
            raise ManifestError("scheduler", "give kv_cache_bytes or kv_cache_gib, not both")

    @property
    def kv_bytes(self) -> int:
        """The KV cache size per worker in bytes (default 2 GiB; an instance has workers x this)."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        return int((self.kv_cache_gib or 2.0) * 2**30)


@dataclass(frozen=True)
class TlsSpec:
    cert: str = field(default="", metadata=_str())  # PEM certificate chain the gateway presents
    key: str = field(default="", metadata=_str())  # its PEM private key

    def __post_init__(self) -> None:
        if not (self.cert and self.key):
            raise ManifestError("gateway.tls", "needs both cert and key (PEM file paths)")


@dataclass(frozen=True)
class GatewaySpec:
    host: str = field(default="127.0.0.1", metadata=_str())  # address to listen on
    port: int = field(default=50051, metadata=_int(0, 65535))  # 0 = any free port
    metrics_port: int | None = field(default=None, metadata=_int(0, 65535, optional=True))  # /metrics; 0/null = off
    # output that breaks the chat format ends the answer with finish_reason "error" (default: sent on as content)
    strict_output_format: bool = field(default=False, metadata=_bool())
    http_port: int | None = field(default=None, metadata=_int(0, 65535, optional=True))  # OpenAI API; null = off
    default_thinking: bool = field(default=False, metadata=_bool())  # thinking mode when a request does not say
    served_model_name: str | None = field(default=None, metadata=_str(optional=True))  # default: from the model
    # the largest request body taken, in bytes (larger ones get RESOURCE_EXHAUSTED); grpc's default is 4 MiB
    max_request_bytes: int = field(default=4 * 1024 * 1024, metadata=_int(1024, 2**31 - 1))
    max_prompt_tokens: int | None = field(default=None, metadata=_int(1, optional=True))  # null: the context
    tls: TlsSpec | None = field(default=None, metadata=_optional_section(TlsSpec))  # null: plaintext (loopback)


@dataclass(frozen=True)
class InstanceSpec:
    workers: int = field(default=1, metadata=_int(1, 1024))  # expert-parallel workers; each holds E/workers experts
    communicator: str | None = field(default=None, metadata=_choice(COMMUNICATORS, optional=True))  # default by backend
    num_cpus: float = field(default=1.0, metadata=_positive_float())  # logical CPUs per worker (ray)
    num_gpus: float = field(default=0.0, metadata=_nonnegative_float())  # GPUs per worker (ray; 1 on GPU nodes)
    resources: tuple[tuple[str, float], ...] = field(default=(), metadata=_resources())  # custom Ray resources
    placement: str = field(default="spread", metadata=_choice(PLACEMENTS))  # workers over nodes (ray)
    context_parallel_min_tokens: int = field(default=0, metadata=_int(0))  # prefill chunks this long split over
    # the workers (context-parallel prefill; 0 = off)


@dataclass(frozen=True)
class PoolSpec(InstanceSpec):
    """A pool of identical instances; `name` is its key in `pools`."""

    role: str = field(default="colocated", metadata=_choice(ROLES))
    instances: int = field(default=1, metadata=_int(1, 4096))  # engine instances in this pool
    name: str = field(default="colocated", metadata=_str())


@dataclass(frozen=True)
class RaySpec:
    address: str | None = field(default=None, metadata=_str(optional=True))  # host:port or auto; none = start one


@dataclass(frozen=True)
class Manifest:
    version: int = field(default=0, metadata=_choice(MANIFEST_VERSIONS))
    model: ModelSpec = field(default_factory=ModelSpec, metadata=_section(ModelSpec))
    backend: str = field(default="inprocess", metadata=_choice(BACKENDS))
    instance: InstanceSpec = field(default_factory=InstanceSpec, metadata=_section(InstanceSpec))
    pools_: tuple[PoolSpec, ...] | None = field(default=None, metadata={**_pools(), "key": "pools"})
    ray: RaySpec = field(default_factory=RaySpec, metadata=_section(RaySpec))
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec, metadata=_section(SchedulerSpec))
    gateway: GatewaySpec = field(default_factory=GatewaySpec, metadata=_section(GatewaySpec))

    def __post_init__(self) -> None:
        if self.pools_ is not None and self.instance != InstanceSpec():
            raise ManifestError("pools", "give pools or instance, not both")
        for pool in self.pools:
            prefix = f"pools.{pool.name}" if self.pools_ is not None else "instance"
            comm = pool.communicator
            if self.backend == "inprocess" and comm not in (None, "local"):
                raise ManifestError(f"{prefix}.communicator", f"the inprocess backend uses local, got {comm!r}")
            if self.backend == "ray" and comm == "local":
                raise ManifestError(f"{prefix}.communicator", "the ray backend needs gloo or nccl, got 'local'")
            if self.backend == "inprocess" and (pool.num_gpus or pool.resources):
                raise ManifestError(f"{prefix}.resources", "num_gpus and resources place Ray actors; backend inprocess")

    @property
    def pools(self) -> tuple[PoolSpec, ...]:
        """The pools: as given, or one colocated pool of one instance made of `instance`."""
        if self.pools_ is not None:
            return self.pools_
        return (PoolSpec(**{f.name: getattr(self.instance, f.name) for f in dataclasses.fields(InstanceSpec)}),)

    def pool_path(self, pool: PoolSpec) -> str:
        """The key path of a pool in this manifest (for error messages)."""
        return f"pools.{pool.name}" if self.pools_ is not None else "instance"

    def communicator_of(self, pool: PoolSpec) -> str:
        return pool.communicator or ("local" if self.backend == "inprocess" else "gloo")

    @property
    def communicator(self) -> str:
        return self.communicator_of(self.pools[0])

    @property
    def handoff_transport(self) -> str:
        """The KV handoff's transport, `auto` resolved: collective where every pool uses nccl."""
        chosen = self.scheduler.handoff_transport
        if chosen != "auto":
            return chosen
        return "collective" if all(self.communicator_of(p) == "nccl" for p in self.pools) else "object_store"


def parse_section(cls: type, raw: Any, path: str = "") -> Any:
    """Build the dataclass `cls` from a mapping; every key is parsed by its field's metadata."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ManifestError(path, f"must be a mapping, got {type(raw).__name__}")
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.name != "name"}
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ManifestError(key_path, f"unknown key; known keys: {', '.join(fields)}")
        kwargs[fields[key].name] = fields[key].metadata["parse"](value, key_path)
    return cls(**kwargs)


def parse_manifest(raw: Any) -> Manifest:
    """A manifest from parsed YAML (None = all defaults)."""
    return parse_section(Manifest, raw)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file; errors name the file and the key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ManifestError("", f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ManifestError("", f"{path}: not valid YAML ({e})") from None
    try:
        return parse_manifest(raw)
    except ManifestError as e:
        raise ManifestError(e.path, f"{e.args[0].removeprefix(e.path + ': ')} (in {path})") from None
