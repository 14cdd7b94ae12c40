"""The torch process group's rendezvous listens on MASTER_ADDR only, never on the wildcard.

A real local Ray (127.0.0.1, single-machine mode) runs a real 2-worker TorchTrainer with
trainer.ray_private.bound_torch_config("gloo"), as `linrep train` does. Each worker does an
all_reduce over gloo and, while the process group is up, reads its own listening TCP sockets;
rank 0 writes down what every rank saw. Ray's own TorchConfig shows torch's TCPStore on `::`.
"""

from __future__ import annotations

import json
import os

from trainer import ray_private

WILDCARD = {"0.0.0.0", "::"}


def listener_report_fn():
    """The train function, built here so that Ray pickles it by value (the workers cannot
    import this test module)."""

    def all_reduce_and_list_listeners(config: dict) -> None:
        """Ray Train worker: all_reduce(rank + 1) over the group, then write every rank's sum, its
        MASTER_ADDR/MASTER_PORT and its listening sockets (read while the group is up) to
        config["out"]."""
        import psutil
        import torch
        import torch.distributed as dist

        total = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(total)
        listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
                            if c.status == psutil.CONN_LISTEN})
        mine = {"rank": dist.get_rank(), "backend": dist.get_backend(), "sum": total.item(),
                "master": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])],
                "listening": [[ip, port] for ip, port in listening]}
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() == 0:  # a file, not ray.train.report: V2 keeps metrics only with checkpoints
            with open(config["out"], "w") as f:
                json.dump(ranks, f)

    return all_reduce_and_list_listeners


def test_gloo_rendezvous_listens_on_master_addr_only(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path / "ranks.json"
    trainer = TorchTrainer(listener_report_fn(), train_loop_config={"out": str(out)}, torch_config=ray_private.bound_torch_config("gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=2),
                           run_config=ray.train.RunConfig(name="rendezvous", storage_path=str(tmp_path)))
    trainer.fit()
    ranks = json.loads(out.read_text())

    assert [(r["rank"], r["backend"], r["sum"]) for r in ranks] == [(0, "gloo", 3.0), (1, "gloo", 3.0)]
    master = ranks[0]["master"]
    assert master[0] == "127.0.0.1" and all(r["master"] == master for r in ranks), ranks
    # rank 0's TCPStore serves on MASTER_ADDR:MASTER_PORT (so the sockets read are the live ones)...
    assert master in ranks[0]["listening"], ranks
    # ...and no worker listens on the wildcard (Ray's TorchConfig: the store on `::`, measured)
    wildcard = [(r["rank"], ip, port) for r in ranks for ip, port in r["listening"] if ip in WILDCARD]
    assert not wildcard, ranks


def test_tcpstore_serves_on_the_socket_it_is_given():
    """What the backend relies on in torch: a master TCPStore (default libuv backend) serves on an
    already-listening socket passed as master_listen_fd, and opens no listener of its own."""
    import socket
    from datetime import timedelta

    import psutil
    from torch.distributed import TCPStore

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    master = TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False,
                      master_listen_fd=listener.detach())
    client = TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=10))
    client.set("key", "value")
    assert master.get("key") == b"value" and master.port == port and master.libuvBackend
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", port) in listening and not [ip for ip, _ in listening if ip in WILDCARD], listening
