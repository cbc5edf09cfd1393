"""A plain hivemind ``Server`` serving given uids of a manifest: the baseline ``volunteer start`` is compared to.

Built only from hivemind's own parts (``ModuleBackend``, ``Server``, ``DHT``) with the volunteer's
settings: 2 connection handlers, the same max batch size, the same optimizer, the same initial weights
(``volunteer.serving.backends.initial_seed``), the same announce period. It prints a line in the volunteer's
format, ``serving N experts of plain-hivemind on cpu as PEER: uids``, and stops on SIGTERM or SIGINT.

    python -m bench.plain_server --experiment FILE --initial-peers MADDR --max-batch-size 1024 UID...
"""

from __future__ import annotations

import argparse
import signal
import threading

import hivemind
import torch
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from volunteer.core.manifest import load
from volunteer.core.procgroup import become_supervisor
from volunteer.serving.backends import initial_seed
from volunteer.serving.experts import build_expert, build_optimizer, sample_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--initial-peers", required=True, help="comma-separated multiaddrs")
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--num-handlers", type=int, default=2)
    parser.add_argument("--update-period", type=float, default=20.0)  # the volunteer's announce_interval
    parser.add_argument("uids", nargs="+")
    args = parser.parse_args()

    become_supervisor()  # no process of ours may outlive us, as for the volunteer
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    manifest = load(args.experiment)
    dht = hivemind.DHT(initial_peers=args.initial_peers.split(","), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       start=True)
    backends = {}
    for uid in args.uids:
        expert_type = manifest.expert_type_of(uid)
        module = build_expert(expert_type.block, manifest.d_model, expert_type.d_hidden, seed=initial_seed(uid))
        optimizer = build_optimizer(manifest.optimizer.name, module.parameters(), lr=manifest.optimizer.lr)
        sample = sample_input(expert_type.block, 1, manifest.d_model)
        backends[uid] = ModuleBackend(
            uid, module, optimizer=optimizer, args_schema=(BatchTensorDescriptor.from_tensor(sample),),
            min_batch_size=1, max_batch_size=args.max_batch_size,
        )
    server = hivemind.moe.Server(dht, backends, num_connection_handlers=args.num_handlers,
                                 update_period=args.update_period, device=torch.device("cpu"))
    try:
        server.run_in_background(await_ready=True, timeout=120)
        print(f"serving {len(backends)} experts of plain-hivemind on cpu as {dht.peer_id.to_base58()}: "
              + " ".join(backends), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.join(timeout=30)


if __name__ == "__main__":
    main()
