"""RegistryWatcher: one task polls, calls every subscriber in order, survives a failing one, and
stops on close()."""
import asyncio
import logging

from prefloop.server.serving.registry_watcher import RegistryWatcher


def test_one_poll_calls_every_subscriber_once_in_order():
    calls = []
    watcher = RegistryWatcher(poll_s=0)

    for name in ("switcher", "ab"):
        async def subscriber(name=name):
            calls.append(name)
        watcher.subscribe(subscriber)

    asyncio.run(watcher.poll_once())
    assert calls == ["switcher", "ab"]


def test_a_failing_subscriber_stops_neither_the_others_nor_the_next_poll(caplog):
    calls = []

    async def failing():
        calls.append("failing")
        raise RuntimeError("registry unreadable")

    async def healthy():
        calls.append("healthy")

    async def main():
        watcher = RegistryWatcher(poll_s=0.01)
        watcher.subscribe(failing)
        watcher.subscribe(healthy)
        await watcher.start()
        for _ in range(500):
            if calls.count("healthy") >= 2:
                break
            await asyncio.sleep(0.01)
        await watcher.close()

    with caplog.at_level(logging.ERROR, logger="prefloop.server.serving.registry_watcher"):
        asyncio.run(main())
    assert calls.count("healthy") >= 2 and calls.count("failing") >= 2
    assert calls[:4] == ["failing", "healthy", "failing", "healthy"]
    assert "registry unreadable" in caplog.text


def test_close_stops_polling():
    calls = []

    async def subscriber():
        calls.append(1)

    async def main():
        watcher = RegistryWatcher(poll_s=0.01)
        watcher.subscribe(subscriber)
        await watcher.start()
        while not calls:
            await asyncio.sleep(0.01)
        await watcher.close()
        seen = len(calls)
        await asyncio.sleep(0.1)  # ten intervals
        return seen

    seen = asyncio.run(main())
    assert seen >= 1 and len(calls) == seen


def test_no_task_when_the_interval_is_zero():
    calls = []

    async def subscriber():
        calls.append(1)

    async def main():
        watcher = RegistryWatcher(poll_s=0)
        watcher.subscribe(subscriber)
        await watcher.start()
        await asyncio.sleep(0.05)
        await watcher.close()

    asyncio.run(main())
    assert calls == []


def test_switcher_and_ab_controller_subscribe_unless_their_interval_is_zero(tmp_path):
    from prefloop.server.api.ab_controller import ABController
    from prefloop.server.serving.hot_swap import ModelSwitcher

    watcher = RegistryWatcher(poll_s=1)
    ModelSwitcher(None, None, poll_interval_s=0).watch(watcher)
    ABController(None, None, tmp_path, poll_s=0).watch(watcher)
    assert watcher._subscribers == []

    switcher = ModelSwitcher(None, None, poll_interval_s=2)
    controller = ABController(None, None, tmp_path, poll_s=2)
    switcher.watch(watcher)
    controller.watch(watcher)
    assert watcher._subscribers == [switcher.poll, controller.check]
