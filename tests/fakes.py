"""Fakes shared by several test modules, passed in as parameters (never patched in): one place for each.

- the NVML binding and torch.cuda surface that hardware detection and device matching call;
- a table of volunteer machines (hardware profiles) and two manifests to plan for, with the invariants
  every plan made for them keeps (``check_plan``);
- arbitrary JSON values (a hypothesis strategy), what a hostile peer or coordinator could send;
- a coordinator on 127.0.0.1 that answers whatever a test tells it to.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from hypothesis import strategies as st

from volunteer.host.hardware import CPUInfo, GPUInfo, HardwareProfile

with warnings.catch_warnings():
    # Importing hivemind calls torch.jit.script, which torch 2.13 deprecates with a warning attributed to
    # torch.jit (the same guard as test_sizing's).
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.core.manifest import Manifest, default_manifest
from volunteer.planning.choice import Plan
from volunteer.planning.memory import (
    CPU_BASE_OVERHEAD,
    CUDA_CONTEXT_RESERVE,
    expert_cost,
)

MiB, GiB, GB = 2**20, 2**30, 10**9


# --- NVML and torch.cuda ---------------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # the names pynvml gives them
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


class FakeNVML:
    """The subset of pynvml that detection calls, over a list of GPU dicts; ``fail`` names calls that raise.

    ``names`` maps pids to process names; a pid missing from it is one NVML may not read.
    """

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]], fail: tuple[str, ...] = (), init_error: Exception | None = None,
                 names: dict[int, str | bytes] | None = None):
        self.gpus, self.fail, self.init_error = gpus, fail, init_error
        self.names = names if names is not None else {}
        self.initialized = False

    def _call(self, name: str, handle: int, value: Any) -> Any:
        if name in self.fail:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self._call("driver", -1, b"550.54.15")

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self._call("cuda", -1, 12040)

    def nvmlSystemGetProcessName(self, pid: int) -> str | bytes:
        if pid not in self.names:
            raise NVMLError_NoPermission("Insufficient Permissions")
        return self.names[pid]

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return self._call("compute", h, [SimpleNamespace(**p) for p in self.gpus[h].get("compute", [])])

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return self._call("graphics", h, [SimpleNamespace(**p) for p in self.gpus[h].get("graphics", [])])

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._call("name", h, self.gpus[h]["name"])

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._call("uuid", h, self.gpus[h]["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        g = self.gpus[h]
        return self._call("memory", h, SimpleNamespace(total=g["total"], free=g["free"], used=g["total"] - g["free"]))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return self._call("utilization", h, SimpleNamespace(gpu=self.gpus[h]["util"], memory=0))

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._call("temperature", h, self.gpus[h]["temp"])

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._call("power", h, self.gpus[h]["milliwatts"])

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self._call("capability", h, self.gpus[h]["cc"])


class FakeCuda:
    """torch.cuda's surface that matching uses; ``visible`` lists the UUIDs torch would report, in its order."""

    def __init__(self, visible: list[Any], available: bool = True):
        self.visible, self.available, self.calls = visible, available, []

    def is_available(self) -> bool:
        self.calls.append("is_available")
        return self.available

    def device_count(self) -> int:
        return len(self.visible)

    def get_device_properties(self, index: int) -> SimpleNamespace:
        uuid = self.visible[index]
        return SimpleNamespace(name="GPU") if uuid is None else SimpleNamespace(name="GPU", uuid=uuid)


class CUuuid:
    """torch's ``_CUuuid``: 16 raw bytes, printed as 8-4-4-4-12 hex."""

    def __init__(self, text: str):
        self.bytes = uuid.UUID(text).bytes

    def __repr__(self) -> str:
        return str(uuid.UUID(bytes=self.bytes))


# --- volunteer machines and manifests to plan for --------------------------------------------------


DEFAULT = default_manifest()
BIG = Manifest.from_dict(
    {
        "schema_version": 1,
        "name": "big-lm",
        "dht_prefix": "big",
        "d_model": 1024,
        "max_batch_size": 1024,
        "expert_types": [
            {"name": "small", "block": "residual_ffn", "d_hidden": 4096},
            {"name": "large", "block": "swiglu_ffn", "d_hidden": 8192},
        ],
        "layers": [
            {"uid_prefix": "big_ffn0", "grid": [16, 16], "expert_type": "small"},
            {"uid_prefix": "big_ffn1", "grid": [16, 16], "expert_type": "large"},
        ],
    }
)
MANIFESTS = [DEFAULT, BIG]


def gpu_box(total_gb: float, index: int = 0) -> GPUInfo:
    total = int(total_gb * GB)
    return GPUInfo(index, f"GPU {total_gb:g} GB", f"GPU-{index}", total, total - 300 * MiB)


CPU_SMALL = CPUInfo(cores=2, memory_total=4 * GB, memory_available=3 * GB, model="laptop")
CPU_DESKTOP = CPUInfo(cores=8, memory_total=32 * GB, memory_available=24 * GB)
# From smallest to largest: each row lends at least as much as the one before.
MACHINES = {
    "cpu-2-cores-4GB": HardwareProfile(CPU_SMALL, (), "NVML not found"),
    "gpu-6GB": HardwareProfile(CPU_DESKTOP, (gpu_box(6),)),
    "gpu-8GB": HardwareProfile(CPU_DESKTOP, (gpu_box(8),)),
    "gpu-24GB": HardwareProfile(CPU_DESKTOP, (gpu_box(24),)),
    "gpu-24GB+6GB": HardwareProfile(CPU_DESKTOP, (gpu_box(24, 0), gpu_box(6, 1)), None, "550.54.15", "12.4"),
    "gpu-80GB": HardwareProfile(CPU_DESKTOP, (gpu_box(80),)),
}


def reserve(plan: Plan) -> int:
    return CUDA_CONTEXT_RESERVE if plan.device.is_gpu else CPU_BASE_OVERHEAD


def uid_costs(manifest: Manifest, plan: Plan) -> dict[str, int]:
    per_type = {t.name: expert_cost(manifest, t, plan.max_batch_size, plan.device.kind).total for t in manifest.expert_types}
    return {uid: per_type[layer.expert_type] for layer in manifest.layers for uid in layer.uids()}


def check_plan(manifest: Manifest, plan: Plan, counts: dict[str, int], served: dict[str, float] | None = None) -> None:
    """Invariants every plan keeps, replaying its picks one by one."""
    cost = uid_costs(manifest, plan)
    assert len(set(plan.uids)) == len(plan.uids) and plan.uids
    assert set(plan.uids) <= set(cost)
    assert plan.expert_types == tuple(manifest.layer_of(uid).expert_type for uid in plan.uids)
    assert plan.planned_bytes == reserve(plan) + sum(cost[uid] for uid in plan.uids) <= plan.budget_bytes
    assert plan.reserve_bytes == reserve(plan)
    assert plan.planned_bytes == plan.reserve_bytes + sum(
        next(c.total for c in plan.costs if c.expert_type == t) for t in plan.expert_types
    )
    left = plan.budget_bytes - reserve(plan)
    unpicked = set(cost)

    def need(uid: str) -> tuple[bool, float, int]:  # preferred, then least served throughput, then fewest servers
        return counts.get(uid, 0) >= 0, (served or {}).get(uid, 0.0), counts.get(uid, 0)

    for uid in plan.uids:
        # never a more-served uid while a less-served one still fits
        assert need(uid) == min(need(u) for u in unpicked if cost[u] <= left)
        unpicked.discard(uid)
        left -= cost[uid]


# --- arbitrary JSON -----------------------------------------------------------------------------------

_scalars = (
    st.none() | st.booleans() | st.integers() | st.sampled_from([0, -1, 2**31, 2**63, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
)
_KEYS = sorted(set(default_manifest().to_dict())
               | {"name", "block", "d_hidden", "uid_prefix", "grid", "expert_type", "lr"})
_keys = st.sampled_from(_KEYS) | st.text(max_size=8)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=24,
)


# --- a coordinator on 127.0.0.1 that answers what the test says ------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0  # seconds to sleep before answering (a slow coordinator)


class FakeCoordinator:
    """stdlib ``http.server`` in a thread; ``answers`` maps a path to what it returns, ``hits`` counts calls."""

    def __init__(self, answers: dict[str, Answer] | None = None) -> None:
        self.answers: dict[str, Answer] = dict(answers or {})
        self.hits: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.handle_error = lambda request, address: None  # a client that hung up is expected here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs=dict(poll_interval=0.05),
                                       name="fake-coordinator", daemon=True)
        self.thread.start()

    def answer(self, path: str = "/v1/experiment", **kw: Any) -> None:
        self.answers[path] = Answer(**kw)

    def stop(self) -> None:
        """Afterwards the port is closed: a coordinator that is down. Safe to call twice."""
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _handler_for(fake: FakeCoordinator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            fake.hits[path] = fake.hits.get(path, 0) + 1
            answer = fake.answers.get(path, Answer(404, b"not found", "text/plain"))
            # sleeping is the point: a coordinator that is slow to answer (capped, so a test cannot hang)
            time.sleep(min(answer.delay, 5.0))
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except OSError:
                pass  # the client gave up (timeout, body too large): what these tests provoke

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
