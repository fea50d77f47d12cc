"""ConfigStore.reload_in_thread: a reload reads and builds off the event loop, installs on it."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

from proxy.snapshot import ConfigStore

FIX = Path(__file__).parent / "fixtures"


def _store(tmp_path: Path, cls=ConfigStore) -> tuple[ConfigStore, Path]:
    conf = tmp_path / "conf"
    shutil.copytree(FIX / "bookinfo", conf)
    store = cls([str(conf)], mode="node", scope=None, clock=lambda: 0.0)
    store.load()
    return store, conf


async def test_the_loop_keeps_running_while_the_config_is_built(tmp_path):
    """The build waits for an event only the event loop sets: were it run on the loop's thread, the
    reload would never finish (the wait gives up after 5 s and the test fails)."""
    gate = threading.Event()
    seen: dict = {}

    class GatedStore(ConfigStore):
        def build(self):
            if self.current is not None:   # the reload, not the first load
                seen["thread"] = threading.get_ident()
                seen["loop_ran"] = gate.wait(5)
            return super().build()

    store, _ = _store(tmp_path, GatedStore)
    installed: list = []
    store.subscribe(lambda old, new: installed.append((old.version, new.version, threading.get_ident())))
    loop_thread = threading.get_ident()
    reload = asyncio.ensure_future(store.reload_in_thread())
    await asyncio.sleep(0.01)
    gate.set()   # the loop is free: this line runs while the build thread waits
    assert await reload is True
    assert seen["loop_ran"] and seen["thread"] != loop_thread
    assert installed == [(1, 2, loop_thread)]      # installed, and subscribers called, on the loop's thread
    assert store.current.version == 2 and store.reloads_ok == 1   # the initial load is not a reload


async def test_a_bad_config_or_a_crash_keeps_the_last_good_snapshot(tmp_path):
    store, conf = _store(tmp_path)
    good = store.current
    (conf / "authz.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                                     "metadata: {name: x, namespace: default}\nspec: {action: NOPE}\n")
    assert await store.reload_in_thread() is False
    assert store.current is good and store.reloads_failed == 1
    assert "authz.yaml" in store.last_error and "action" in store.last_error

    class Buggy(ConfigStore):
        def build(self):
            raise KeyError("a bug")

    crash = Buggy([str(conf)], mode="node", scope=None, clock=lambda: 0.0)
    crash.current = good
    assert await crash.reload_in_thread() is False
    assert crash.current is good and crash.reloads_failed == 1 and "KeyError" in crash.last_error


async def test_a_cancelled_reload_leaves_the_store_alone(tmp_path):
    """A stop during a reload cancels the awaiting task; the thread's late answer is dropped."""
    gate = threading.Event()

    class Slow(ConfigStore):
        def build(self):
            if self.current is not None:
                gate.wait(5)
            return super().build()

    store, _ = _store(tmp_path, Slow)
    task = asyncio.ensure_future(store.reload_in_thread())
    await asyncio.sleep(0.01)
    task.cancel()
    gate.set()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(0.2)   # the thread finishes and hands its result to a future nobody awaits
    assert store.current.version == 1 and store.reloads_ok == 0


def test_a_load_runs_with_the_cyclic_collector_paused(tmp_path):
    """No collection happens during a load (they were half of a big load's time, policy/mesh.py), and the
    collector's state is what it was afterwards, on or off."""
    import gc

    from benchmarks.config_scale import write_inventory
    from policy.mesh import load_mesh_config
    write_inventory(tmp_path / "inv.yaml", 3_000)
    collections: list = []

    def seen(phase, info):
        if phase == "start":
            collections.append(info["generation"])
    gc.callbacks.append(seen)
    try:
        assert gc.isenabled()
        mesh = load_mesh_config([str(tmp_path)])
        assert len(mesh.inventory.workloads) == 3_000
        # At most the few young passes the first allocations after the load trigger (seen: none, one, or
        # two on a busy box), never a full one; without the pause this load ran 626 collections, 4 full.
        assert len(collections) <= 3 and 2 not in collections and gc.isenabled(), collections
        gc.disable()
        load_mesh_config([str(tmp_path)])
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(seen)
