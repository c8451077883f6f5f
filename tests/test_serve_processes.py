"""tasks/local_server.py's process handling (psutil): a process tree is found whole and stopped whole."""

from __future__ import annotations

import os
import subprocess
import time

from tasks.local_server import LocalPrefect, _command_line, free_port, pid_alive, process_tree, terminate_tree


def test_terminate_tree_stops_a_process_and_its_children() -> None:
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 30
    while len(process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    tree = process_tree(proc.pid)
    assert tree[0] == proc.pid and len(tree) == 3
    assert "sleep 60 & sleep 60" in _command_line(proc.pid)
    assert all(pid_alive(p) for p in tree)
    terminate_tree(proc.pid, grace=5)
    assert not any(pid_alive(p) for p in tree)
    assert _command_line(proc.pid) == "" and process_tree(proc.pid) == [proc.pid]


def test_status_without_a_server_says_so_and_fails(tmp_path, capsys) -> None:
    local = LocalPrefect(state_dir=tmp_path / ".serve", port=free_port())
    (tmp_path / ".serve").mkdir()
    local.pid_file("server").write_text(f"{os.getpid()}\n")  # a live PID that is not a Prefect process
    assert local.running("server") is None
    assert local.status() == 1
    out = capsys.readouterr().out
    assert "server: not running" in out and "worker: not running" in out
