"""Running unattended: the output lock and exit codes, reruns, S3 through a local S3-compatible server, faults
(a generate actor killed, the driver SIGKILLed), and `ray job submit` against a real head with its job server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from pipeline.demo_data import write_demo_data
from tests.conftest import ROOT, run_cli

TARGET = str(ROOT / "models/target")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(shards: Path, out, *extra: str) -> list[str]:
    sets = [f"input.paths=['{shards}/*.tar']", f"output.path={out}", f"model.target={TARGET}",
            "model.drafter=null", "decoding.max_new_tokens=6", "resources.cpus_per_actor=1",
            "resources.batch_size=4", *extra]
    return [a for s in sets for a in ("--set", s)]


def _keys(out: Path) -> list[str]:
    return [k for p in sorted(out.glob("part-*.parquet")) for k in pq.read_table(p).column("key").to_pylist()]


def _run_in_background(args: list[str], address: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=address)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_output_lock_refuses_a_second_live_run_and_takes_over_a_dead_ones(tmp_path, ray_address):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=4, rows_per_shard=2)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "_LOCK"
    # a live holder: this very process, heartbeat now
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "x",
                                "heartbeat": time.time()}))
    done = run_cli("run", str(ROOT / "configs/demo.yaml"), *_sets(shards, out), address=ray_address)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "being written by another run" in done.stderr and not list(out.glob("part-*"))
    # a dead holder (a pid that has exited) is taken over
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "token": "y",
                                "heartbeat": time.time()}))
    done = run_cli("run", str(ROOT / "configs/demo.yaml"), *_sets(shards, out), address=ray_address)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not lock.exists() and len(_keys(out)) == 4  # released at the end
    # --overwrite redoes committed shards
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    done = run_cli("run", str(ROOT / "configs/demo.yaml"), *_sets(shards, out), "--overwrite", address=ray_address)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)
    assert json.loads((out / "metrics.json").read_text())["shards_skipped"] == []


def test_s3_input_and_output_through_a_local_s3_server(tmp_path):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    try:
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing")
        fs.mkdir("specray-test")
        write_demo_data(str(tmp_path / "local"), num_samples=6, rows_per_shard=3)
        fs.put(str(tmp_path / "local") + "/", "specray-test/in/", recursive=True)
        args = ["run", str(ROOT / "configs/demo.yaml"),
                *[a for s in [f"model.target={TARGET}", "model.drafter=null", "decoding.max_new_tokens=6",
                              "input.paths=['s3://specray-test/in/*.tar']", "output.path=s3://specray-test/out",
                              "resources.cpus_per_actor=1"] for a in ("--set", s)]]
        # its own local Ray: the workers must see the endpoint in their environment
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                              env={k: v for k, v in {**os.environ, **env}.items() if k != "RAY_ADDRESS"},
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("specray-test/out"))
        assert names == ["_SUCCESS", "metrics.json", "part-shard-00000.parquet", "part-shard-00001.parquet"]
        rows = sum(pq.read_table(fs.open(f"specray-test/out/{n}", "rb")).num_rows for n in names if n.startswith("part"))
        assert rows == 6
        assert json.loads(fs.cat("specray-test/out/metrics.json"))["rows_in_output"] == 6
    finally:
        server.stop()


def test_driver_killed_mid_job_then_the_rerun_finishes_without_duplicates(tmp_path, ray_address):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=40, rows_per_shard=4)  # 10 shards
    out = tmp_path / "out"
    args = ["run", str(ROOT / "configs/demo.yaml"), *_sets(shards, out)]
    job = _run_in_background(args, ray_address)
    _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2 or job.poll() is not None, 300, "a committed shard")
    assert job.poll() is None, "the job finished before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 2 <= len(committed) < 10 and (out / "_LOCK").exists() and not (out / "_SUCCESS").exists()
    done = run_cli(*args, address=ray_address)  # the dead driver's lock is taken over
    assert done.returncode == 0, done.stderr[-3000:]
    keys = _keys(out)
    assert len(keys) == 40 and len(set(keys)) == 40  # every row exactly once
    assert all(committed[n] == (out / n).stat().st_mtime_ns for n in committed)  # committed shards not redone
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["shards_skipped"]) == len(committed) and metrics["rows"] == 40 - 4 * len(committed)


def _generate_actor_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MapBatches(GenerateActor)" in part for part in (p.info["cmdline"] or []))]


def test_a_killed_generate_actor_is_restarted_and_every_row_comes_out_once(tmp_path, ray_address):
    """Two actors, shards committed in whatever order their rows finish: killing every actor mid-job loses no row
    and writes none twice, and each shard's part file holds exactly its own rows."""
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=40, rows_per_shard=4)
    out = tmp_path / "out"
    args = ["run", str(ROOT / "configs/demo.yaml"),
            *_sets(shards, out, "resources.num_actors=2", "resources.cpus_per_actor=0.5")]
    job = _run_in_background(args, ray_address)
    _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 1 or job.poll() is not None, 300, "a committed shard")
    pids = _generate_actor_pids()
    assert job.poll() is None and pids, "no generate actor to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    keys = _keys(out)
    assert len(keys) == 40 and len(set(keys)) == 40
    for part in out.glob("part-*.parquet"):
        assert set(pq.read_table(part).column("shard").to_pylist()) == {part.stem.removeprefix("part-")}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["errors"] == 0 and metrics["commit_order"] == "any"


def test_ray_job_submit_to_a_real_head(tmp_path):
    """`ray start --head` (dashboard and job server included), then `ray job submit --working-dir .` of the demo
    config; the job's output is checked once it has succeeded."""
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=8, rows_per_shard=4)
    out = tmp_path / "out"
    gcs, dashboard, agent, agent_grpc, runtime_env = (_free_port() for _ in range(5))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", RAY_TMPDIR=ray_tmp)
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             # not the default agent ports: the test session's own Ray already holds them, and an
                             # agent without its HTTP port cannot take jobs ("No available agent to submit job")
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "-m", "pipeline", "run", "configs/demo.yaml",
                  "--set", f"input.paths=['{shards}/*.tar']", "--set", f"output.path={out}",
                  "--set", "decoding.max_new_tokens=8", "--set", "resources.cpus_per_actor=1"]
        deadline = time.time() + 480  # on a loaded 2-core machine the agent once took over 300 s
        while True:  # the job server and the node's job agent come up a little after the head
            done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            starting = any(m in done.stdout + done.stderr for m in ("Failed to connect", "try again later"))
            if done.returncode == 0 or not starting or time.time() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "succeeded" in done.stdout
        assert len(_keys(out)) == 8 and (out / "_SUCCESS").exists()
        assert json.loads((out / "metrics.json").read_text())["acceptance_rate"] > 0.5  # the demo drafter ran
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_unreadable_shard_is_reported_while_the_rest_finish(tmp_path, ray_address):
    shards = tmp_path / "shards"
    write_demo_data(str(shards), num_samples=8, rows_per_shard=4)
    good = (shards / "shard-00000.tar").read_bytes()
    (shards / "shard-truncated.tar").write_bytes(good[: len(good) // 2])
    (shards / "shard-garbage.tar").write_bytes(b"this is not a tar file at all" * 50)
    out = tmp_path / "out"
    args = ["run", str(ROOT / "configs/demo.yaml"), *_sets(shards, out)]
    done = run_cli(*args, address=ray_address)
    assert done.returncode == 4, done.stderr[-3000:]
    assert "2 UNREADABLE" in done.stdout and "truncated tar" in done.stdout
    assert sorted(p.name for p in out.glob("part-*")) == ["part-shard-00000.parquet", "part-shard-00001.parquet"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["shards_unreadable"]) == {"shard-truncated", "shard-garbage"} and metrics["rows"] == 8
    assert not (out / "_SUCCESS").exists()  # the output is not complete
    # fail fast instead: nothing runs, and even with --overwrite the output is left as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    failed = run_cli(*args, "--set", "input.on_unreadable=fail", "--overwrite", address=ray_address)
    assert failed.returncode == 1 and "input.on_unreadable is fail" in failed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before


def test_shipped_cluster_examples_run_a_valid_pipeline_command():
    """docs/rayjob.yaml (KubeRay), docs/cronjob.yaml and docs/crontab each end in a `python -m pipeline run` whose
    config and overrides validate."""
    import shlex

    import yaml

    rayjob = yaml.safe_load((ROOT / "docs/rayjob.yaml").read_text())
    cronjob = yaml.safe_load((ROOT / "docs/cronjob.yaml").read_text())
    crontab = [line for line in (ROOT / "docs/crontab").read_text().splitlines() if line and not line.startswith("#")]
    assert rayjob["kind"] == "RayJob" and cronjob["kind"] == "CronJob" and len(crontab) == 1
    commands = [
        shlex.split(rayjob["spec"]["entrypoint"]),
        cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"],
        shlex.split(crontab[0].split(" -- ", 1)[1].split(">>")[0]),
    ]
    for cmd in commands:
        args = cmd[cmd.index("pipeline") + 1:]
        assert args[0] == "run"
        done = run_cli("validate", *args[1:])
        assert done.returncode == 0, (cmd, done.stderr)
        assert "s3://my-bucket" in done.stdout
