"""psprobe's demo: a mesh of simulated archives -> sync -> collect -> what reached the broker.

Three simulated esmond archives (the simulator of the test suite, on loopback), a
MeshConfig document naming them, and the local RabbitMQ.  Everything runs the
real `psprobe` command; systemd is left out (sync writes its timer links into a
scratch directory), so it works on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from esmond_sim import EsmondSim

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def psprobe(conf: Path, *args: str) -> int:
    print(f"\n$ psprobe {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "psprobe", "--config", str(conf), *args]).returncode


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="psprobe-demo-"))
    sims = [EsmondSim().start() for _ in range(3)]
    try:
        hosts = []
        for i, sim in enumerate(sims):
            h = sim.host(sim.netloc)
            h.add_test("throughput", step=3600)
            h.add_test("latencybg", step=60)
            h.add_test("trace", step=600)
            hosts.append(sim.netloc)
            print(f"archive {i + 1}: http://{sim.netloc}/esmond/perfsonar/archive/ "
                  f"({h.total_points()} points in {len(h.pairs())} series)")
        mesh = {"description": "psprobe demo mesh", "organizations": [{"sites": [{"hosts": [
            {"addresses": [h], "measurement_archives": [{
                "type": "perfsonarbuoy/owamp",
                "read_url": f"http://{h}/esmond/perfsonar/archive/"}]} for h in hosts]}]}],
            "tests": [{"members": {"type": "mesh", "members": hosts}}]}
        (work / "mesh.json").write_text(json.dumps(mesh, indent=1))
        conf = work / "psprobe.conf"
        conf.write_text(f"""[collect]
state_dir = {work}/state
[archive]
schemes = http
[broker]
url = {AMQP}
exchange = osg.ps.raw
declare_exchange = yes
[mesh]
urls = {work}/mesh.json
unit_dir = {work}/systemd
[metrics]
textfile_dir =
""")
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        ch = conn.channel()
        ch.exchange_declare("osg.ps.raw", exchange_type="topic", durable=True)
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, "osg.ps.raw", routing_key="perfsonar.raw.#")

        psprobe(conf, "sync", "--dry-run")
        psprobe(conf, "sync", "--no-systemctl")
        links = sorted(p.name for p in (work / "systemd" / "psprobe-timers.target.wants").iterdir())
        print("enabled timers:", ", ".join(links))
        status = 0
        for h in hosts:
            status |= psprobe(conf, "collect", h)
        got = []
        while True:
            method, props, body = ch.basic_get(q, auto_ack=True)
            if method is None:
                break
            got.append((method.routing_key, props, json.loads(body)))
        print(f"\nThe broker received {len(got)} messages, "
              f"{sum(len(b['datapoints']) for _, _, b in got)} points:")
        for key, n in sorted(Counter(k for k, _, _ in got).items()):
            print(f"  {key:40} {n:4} messages")
        key, props, body = got[0]
        body["datapoints"] = dict(list(body["datapoints"].items())[:3])
        print(f"\nOne of them ({key}, message_id {props.message_id}, delivery_mode "
              f"{props.delivery_mode}; first 3 points shown):")
        print(json.dumps(body, indent=1)[:1500])
        print("\nA second run finds nothing new:")
        status |= psprobe(conf, "collect", hosts[0])
        if "status" in subprocess.run([sys.executable, "-m", "psprobe", "--help"],
                                      capture_output=True, text=True).stdout:
            psprobe(conf, "status")
        conn.close()
        print(f"\nState, config and mesh of this demo: {work}")
        return status
    finally:
        for s in sims:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
