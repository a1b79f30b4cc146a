import asyncio

import pytest

from engines.replica.mailbox import Mailbox


def test_whichever_comes_first_and_nothing_is_lost_between_waits() -> None:
    async def main() -> None:
        box = Mailbox()
        assert await box.wait(after=0.01) == ("timeout", None)

        async def work() -> str:
            return "probed"

        assert await box.wait(work=work(), after=5) == ("work", "probed")
        sender = asyncio.create_task(box.send("stop", "owner"))
        kind, cmd = await box.wait(after=5)
        assert kind == "cmd" and cmd.kind == "stop" and not sender.done()
        cmd.finish()
        await asyncio.wait_for(sender, 5)

        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        exited.set_result(3)
        late = asyncio.create_task(box.send("start", "owner"))
        await asyncio.sleep(0)
        assert await box.wait(exited=exited) == ("exit", 3)  # the exit is the strongest news...
        kind, cmd = await box.wait()  # ...and the command that came with it is still there
        assert kind == "cmd" and cmd.kind == "start"
        cmd.finish(ValueError("no"))
        with pytest.raises(ValueError):
            await late

    asyncio.run(main())


def test_slow_work_is_cancelled_when_something_else_comes_first() -> None:
    async def main() -> None:
        box = Mailbox()
        cancelled = asyncio.Event()

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        assert await box.wait(work=slow(), after=0.01) == ("timeout", None)
        assert cancelled.is_set()

    asyncio.run(main())


def test_close_hands_back_pending_commands_and_refuses_new_ones() -> None:
    async def main() -> None:
        box = Mailbox()
        sender = asyncio.create_task(box.send("restart", "owner"))
        await asyncio.sleep(0)
        (pending,) = box.close()
        pending.finish(RuntimeError("shut down"))
        with pytest.raises(RuntimeError, match="shut down"):
            await sender
        with pytest.raises(RuntimeError, match="owner has shut down"):
            await box.send("start", "owner")

    asyncio.run(main())
