"""The journal store: durable commit, replay, torn tails, deletes, compaction."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pigeon.queue import journal as journal_mod
from pigeon.queue.envelope import Envelope, new_evpid
from pigeon.queue.journal import JournalStore, QueueError, QueueLocked


def make_env(msgid: int, rcpt: str = "bob@example.test") -> Envelope:
    return Envelope(
        evpid=new_evpid(msgid),
        dispatcher="local",
        type="mda",
        sender="alice@example.test",
        rcpt=rcpt,
        dest=rcpt,
        ctime=1_800_000_000,
    )


def reopen(spool: Path) -> JournalStore:
    store = JournalStore(spool)
    store.open()
    return store


async def commit_one(store: JournalStore, body: bytes, rcpts: list[str]) -> tuple[int, list[int]]:
    msgid = store.reserve_msgid()
    envs = [make_env(msgid, r) for r in rcpts]
    await store.commit(msgid, body, envs)
    return msgid, [e.evpid for e in envs]


def test_committed_message_survives_reopen(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[int]]:
        store = reopen(tmp_path)
        result = await commit_one(store, b"Subject: hi\r\n\r\nbody\r\n", ["a@x", "b@x"])
        await store.close()
        return result

    msgid, evpids = asyncio.run(scenario())
    store = reopen(tmp_path)
    assert set(store.messages) == {msgid}
    assert {e.evpid for e in store.envelopes()} == set(evpids)
    assert store.read_body(msgid) == b"Subject: hi\r\n\r\nbody\r\n"
    asyncio.run(store.close())


def test_concurrent_commits_share_syncs(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        store = reopen(tmp_path)
        await asyncio.gather(*(commit_one(store, b"x" * 4096, ["a@x"]) for _ in range(200)))
        syncs = store.stats["syncs"]
        count = len(store.messages)
        await store.close()
        return syncs, count

    syncs, count = asyncio.run(scenario())
    assert count == 200
    # Group commit: far fewer fdatasync calls than messages.
    assert syncs < 100


def test_delete_and_update_replay(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[int]]:
        store = reopen(tmp_path)
        msgid, evpids = await commit_one(store, b"body\r\n", ["a@x", "b@x"])
        env = store.envelope(evpids[1])
        assert env is not None
        env.retry = 3
        env.errorline = "451 4.3.0 Try again later"
        store.update(env)
        store.delete([evpids[0]])
        await store.sync()
        await store.close()
        return msgid, evpids

    msgid, evpids = asyncio.run(scenario())
    store = reopen(tmp_path)
    assert store.envelope(evpids[0]) is None
    env = store.envelope(evpids[1])
    assert env is not None and env.retry == 3 and env.errorline.startswith("451")
    store.delete([evpids[1]])
    asyncio.run(store.close())
    store = reopen(tmp_path)
    assert msgid not in store.messages
    assert list(store.envelopes()) == []
    asyncio.run(store.close())


def test_torn_tail_is_cut_and_earlier_messages_kept(tmp_path: Path) -> None:
    async def scenario() -> int:
        store = reopen(tmp_path)
        msgid, _ = await commit_one(store, b"first\r\n", ["a@x"])
        await store.close()
        return msgid

    msgid = asyncio.run(scenario())
    segment = sorted((tmp_path / "queue").glob("*.log"))[-1]
    size = segment.stat().st_size
    with open(segment, "ab") as f:  # half a record, as a crash in mid-append leaves it
        f.write(b"PJ\x01\x00\x00\x10\x00garbage")
    store = reopen(tmp_path)
    assert set(store.messages) == {msgid}
    assert segment.stat().st_size == size
    msgid2, _ = asyncio.run(commit_one(store, b"second\r\n", ["b@x"]))
    asyncio.run(store.close())
    store = reopen(tmp_path)
    assert set(store.messages) == {msgid, msgid2}
    asyncio.run(store.close())


def test_second_daemon_on_same_spool_is_refused(tmp_path: Path) -> None:
    store = reopen(tmp_path)
    with pytest.raises(QueueLocked):
        reopen(tmp_path)
    asyncio.run(store.close())


def test_compaction_moves_live_messages_and_drops_old_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_SIZE", 4096)

    async def scenario() -> tuple[int, set[int]]:
        store = reopen(tmp_path)
        keep, _ = await commit_one(store, b"k" * 1000, ["keep@x"])
        done = set()
        for _ in range(20):
            msgid, evpids = await commit_one(store, b"d" * 1000, ["done@x"])
            store.delete(evpids)
            done.add(msgid)
        before = store.segment_count()
        await store.compact()
        after = store.segment_count()
        assert after < before
        assert store.read_body(keep) == b"k" * 1000
        await store.close()
        return keep, done

    keep, _done = asyncio.run(scenario())
    store = reopen(tmp_path)
    assert set(store.messages) == {keep}
    assert store.read_body(keep) == b"k" * 1000
    assert len(os.listdir(tmp_path / "queue")) <= 2
    asyncio.run(store.close())


def test_readonly_open_sees_queue_without_lock(tmp_path: Path) -> None:
    store = reopen(tmp_path)
    msgid, _ = asyncio.run(commit_one(store, b"x\r\n", ["a@x"]))
    ro = JournalStore(tmp_path, readonly=True)
    ro.open()
    assert set(ro.messages) == {msgid}
    asyncio.run(store.close())


def test_pinned_message_stays_where_its_location_says_until_unpinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body location handed to another process (the relay worker) stays valid."""
    monkeypatch.setattr(journal_mod, "SEGMENT_SIZE", 4096)

    async def scenario() -> None:
        store = reopen(tmp_path)
        keep, _ = await commit_one(store, b"k" * 1000, ["keep@x"])
        for _ in range(10):
            _, evpids = await commit_one(store, b"d" * 1000, ["done@x"])
            store.delete(evpids)
        path, offset, length = store.body_location(keep)
        store.pin(keep)
        await store.compact()
        assert store.body_location(keep) == (path, offset, length)
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(length) == b"k" * 1000
        store.unpin(keep)
        await store.compact()
        assert store.body_location(keep)[0] != path  # moved forward, old segment gone
        assert not os.path.exists(path)
        assert store.read_body(keep) == b"k" * 1000
        await store.close()

    asyncio.run(scenario())


def test_records_of_one_loop_iteration_leave_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes made together cost one writev, and are in the file before the loop waits."""

    async def scenario() -> list[int]:
        store = reopen(tmp_path)
        done = [await commit_one(store, b"x\r\n", ["a@x"]) for _ in range(5)]
        writes: list[int] = []
        real_writev = os.writev

        def counting_writev(fd: int, buffers: list[memoryview]) -> int:
            writes.append(fd)
            return real_writev(fd, buffers)

        monkeypatch.setattr(os, "writev", counting_writev)
        for _, evpids in done:
            store.delete(evpids)
        assert writes == []  # still buffered in this iteration
        await asyncio.sleep(0)
        assert len(writes) == 1
        monkeypatch.undo()
        # In the file (not synced yet): a kill -9 now would not deliver them again.
        check = JournalStore(tmp_path, readonly=True)
        check.open()
        assert check.messages == {}
        await store.close()
        return [msgid for msgid, _ in done]

    asyncio.run(scenario())


def test_failed_write_fails_the_commit_and_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> int:
        store = reopen(tmp_path)
        real_write = os.write

        def full_disk(fd: int, buffers: list[memoryview]) -> int:
            real_write(fd, b"".join(buffers)[:10])  # a torn write, then the error
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "writev", full_disk)
        with pytest.raises(QueueError):
            await commit_one(store, b"lost\r\n", ["a@x"])
        monkeypatch.undo()
        assert store.messages == {}
        msgid, _ = await commit_one(store, b"kept\r\n", ["b@x"])
        await store.close()
        return msgid

    msgid = asyncio.run(scenario())
    store = reopen(tmp_path)
    assert set(store.messages) == {msgid}
    assert store.read_body(msgid) == b"kept\r\n"
    asyncio.run(store.close())


def test_compaction_never_drops_a_segment_with_a_commit_waiting_for_its_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_SIZE", 4096)

    async def scenario() -> int:
        store = reopen(tmp_path)
        msgid = store.reserve_msgid()
        envs = [make_env(msgid)]
        pending = asyncio.get_running_loop().create_task(store.commit(msgid, b"p" * 1000, envs))
        await asyncio.sleep(0)  # the commit has appended and now waits for its sync
        # Another big message rotates to a new segment; compaction runs before the first
        # commit is indexed.
        other = store.reserve_msgid()
        other_envs = [make_env(other)]
        second = asyncio.get_running_loop().create_task(
            store.commit(other, b"o" * 4000, other_envs)
        )
        await asyncio.sleep(0)
        await store.compact()
        await asyncio.gather(pending, second)
        assert store.read_body(msgid) == b"p" * 1000
        await store.close()
        return msgid

    msgid = asyncio.run(scenario())
    store = reopen(tmp_path)
    assert msgid in store.messages
    assert store.read_body(msgid) == b"p" * 1000
    asyncio.run(store.close())


def test_a_message_in_parts_is_stored_whole_and_partial_writes_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big message is committed as its parts (never joined in memory); a writev that
    writes only part of them is resumed where it stopped."""
    parts = [b"Received: from x\r\n", b"Subject: big\r\n\r\n", b"y" * 300_000]
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        # at most 1000 bytes per call, cutting buffers in the middle
        budget, chunks = 1000, []
        for buf in buffers:
            chunks.append(buf[:budget])
            budget -= len(chunks[-1])
            if budget == 0:
                break
        return real_writev(fd, chunks)

    async def scenario() -> int:
        store = reopen(tmp_path)
        msgid = store.reserve_msgid()
        monkeypatch.setattr(os, "writev", short_writev)
        await store.commit(msgid, parts, [make_env(msgid)])
        monkeypatch.undo()
        assert store.read_body(msgid) == b"".join(parts)
        await store.close()
        return msgid

    msgid = asyncio.run(scenario())
    store = reopen(tmp_path)  # replayed from the file: the record is whole and valid
    assert store.read_body(msgid) == b"".join(parts)
    asyncio.run(store.close())
