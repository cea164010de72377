"""The warm start's thread choice reads the cores idle now, not the load average."""

import os

import psutil

from recipe.iib_lpo.demo.warmstart import training_threads


def test_training_threads_follow_current_cpu_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # stale load after a busy period: ignored
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 3.0)
    assert training_threads(sample_s=0) == 2
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 50.0)  # one core busy
    assert training_threads(sample_s=0) == 1
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 100.0)
    assert training_threads(sample_s=0) == 1  # never 0
