"""Two nodes and a witness: either node can be lost and the other leads with the witness's vote."""

import signal
import time

import openai
from servers import LaunchedServer, free_port

SECRET = "witness-secret"


def test_two_nodes_and_a_witness_survive_the_loss_of_the_leader(tiny_demo):
    ports = {"a": free_port(), "b": free_port(), "w": free_port()}
    spec = f"a=http://127.0.0.1:{ports['a']},b=http://127.0.0.1:{ports['b']},w=http://127.0.0.1:{ports['w']}#witness"
    env = {"RINGLEADER_CLUSTER_SECRET": SECRET}
    witness = LaunchedServer("--cluster", spec, "--name", "w", command="witness", port=ports["w"],
                             ready_path="/health", env=env)  # fmt: skip
    nodes = {
        n: LaunchedServer(
            "--model",
            str(tiny_demo),
            "--kv-cache-mib",
            "4",
            "--threads",
            "1",
            "--cluster",
            spec,
            "--name",
            n,
            port=ports[n],
            ready_path="/health",
            env=env,
            defer=True,
        )  # fmt: skip
        for n in ("a", "b")
    }
    try:
        for node in nodes.values():
            node.wait()
        deadline = time.monotonic() + 15
        while not any(nodes[n].answers_ready() for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        leader = next(n for n in nodes if nodes[n].answers_ready())
        other = "b" if leader == "a" else "a"
        assert not witness.answers_ready()  # a witness never serves
        nodes[leader].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while not nodes[other].answers_ready() and time.monotonic() - killed < 10:
            time.sleep(0.05)
        took = time.monotonic() - killed
        print(f"\nwith a witness: {other} leads {took:.2f} s after {leader} was killed")
        assert nodes[other].answers_ready() and took < 5
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{ports[other]}/v1", api_key="unused", max_retries=0
        )
        assert client.completions.create(model="tiny", prompt="still serving", max_tokens=4).choices
    finally:
        for server in (*nodes.values(), witness):
            server.kill()
