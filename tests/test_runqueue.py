"""The run queue: order kept on disk, moves clamped, and queued runs that start back to back when
the devices free up — across an app restart, past a queued run that cannot start (real trainers)."""

from __future__ import annotations

import shutil

import pytest

from helpers import SlowDisk, poll
from mae_core.config import RunConfig
from mae_core.data import sample_photo_paths
from mae_core.runqueue import RunQueue
from mae_core.runs import RunError, RunManager

QUICK = dict(image_size=32, patch_size=8, batch_size=4, devices=1, accelerator="cpu",
             max_steps=2, checkpoint_every_n_steps=2, num_previews=0)
TIMEOUT_S = 240


def quick(**overrides) -> RunConfig:
    return RunConfig().with_overrides(**{**QUICK, **overrides})


def test_queue_order_survives_and_moves_are_clamped(tmp_path):
    queue = RunQueue(tmp_path)
    for run_id in ("a", "b", "c"):
        queue.add(run_id)
    assert RunQueue(tmp_path).ids() == ["a", "b", "c"]  # on disk, for the next app
    assert queue.move("c", -1) == 2 and queue.ids() == ["a", "c", "b"]
    assert queue.move("c", -10) == 1 and queue.ids() == ["c", "a", "b"]
    assert queue.move("c", 10) == 3 and queue.ids() == ["a", "b", "c"]
    assert queue.remove("a") and not queue.remove("a") and queue.ids() == ["b", "c"]
    (tmp_path / ".queue.json").write_text("{not json")  # a damaged file is an empty queue
    assert queue.ids() == []


def test_queued_runs_can_be_reordered_and_removed(tmp_path):
    manager = RunManager(tmp_path / "runs")
    first, position = manager.enqueue(quick())
    second, _ = manager.enqueue(quick())
    third, position = manager.enqueue(quick())
    assert position == 3 and manager.queued() == [first, second, third]
    assert {s["run_id"]: s["state"] for s in manager.list()} == dict.fromkeys(
        (first, second, third), "queued")
    assert manager.live_run() is None  # queued is not live: Start stays possible
    assert manager.move_queued(third, -2) == 1
    assert manager.queued() == [third, first, second]
    manager.delete(first)
    assert manager.queued() == [third, second]
    with pytest.raises(RunError, match="no run named"):  # removed from the queue with its files
        manager.move_queued(first, 1)


def test_a_queue_that_cannot_be_written_refuses_the_run_and_leaves_none_waiting(tmp_path):
    """A queued run outside the queue would wait forever, shown as "queued"."""
    manager = RunManager(tmp_path / "runs")
    manager.queue.path.mkdir()  # not writable as a file
    with pytest.raises(RunError, match="cannot be queued: .*queue.json cannot be written"):
        manager.enqueue(quick())
    assert manager.list() == []


def test_queued_runs_the_queue_file_lost_keep_their_place_and_start(tmp_path):
    """A run made "queued" but not in .queue.json (the app killed between the two writes, the file
    damaged) read "queued" for ever, never started, and Sooner/Later said "not queued"."""
    manager = RunManager(tmp_path / "runs")
    first, _ = manager.enqueue(quick())
    second, _ = manager.enqueue(quick())
    manager.queue.path.write_text('{"order": ')  # damaged: it lists nothing
    restarted = RunManager(tmp_path / "runs")
    assert restarted.queued() == [first, second]  # oldest first
    third, _ = restarted.enqueue(quick())  # listed, after the strays it took back in
    restarted.queue.path.write_text('{"order": ')
    assert restarted.queued() == [first, second, third]
    # The Runs tab passes the statuses it listed (the folder is read once): the same order.
    assert restarted.queued(restarted.list()) == [first, second, third]
    assert restarted.move_queued(second, -1) == 1 and restarted.queued() == [second, first, third]
    assert restarted.queued(restarted.list()) == [second, first, third]
    # (that such a run starts in its turn: the back-to-back test below loses one from the file)


def test_a_run_whose_train_log_is_a_fifo_fails_its_launch_in_words_without_freezing_the_app(
        tmp_path):
    """The launch opened train.log to append the trainer's output: a FIFO there blocked it for
    good, under the runs lock, and every status call of the app waited behind it."""
    import os
    import threading

    manager = RunManager(tmp_path / "runs")
    run_id, _ = manager.enqueue(quick())
    log = manager.paths(run_id).log
    log.unlink(missing_ok=True)
    os.mkfifo(log)
    launched = []
    worker = threading.Thread(target=lambda: launched.append(manager.advance_queue()), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # unblock it, so the test process can end
        os.close(os.open(log, os.O_RDONLY | os.O_NONBLOCK))
    assert launched == [None], "the launch waited on a FIFO"
    status = manager.status(run_id)
    assert status["state"] == "failed"
    assert status["error"] == (f"could not start from the queue: the trainer could not be "
                               f"launched: {log} is not a regular file (a link, a FIFO, a device "
                               "or a folder): remove it")


def test_a_train_log_linked_elsewhere_is_never_written_through(tmp_path):
    """A link planted in a run folder in place of train.log: the launch appended the trainer's
    output to the file it named, outside the runs folder."""
    manager = RunManager(tmp_path / "runs")
    run_id, _ = manager.enqueue(quick())
    outside = tmp_path / "outside.log"
    outside.write_text("someone else's file\n")
    log = manager.paths(run_id).log
    log.unlink(missing_ok=True)
    log.symlink_to(outside)
    assert manager.advance_queue() is None
    status = manager.status(run_id)
    assert status["state"] == "failed"
    assert "(a link, a FIFO, a device or a folder)" in status["error"]
    assert outside.read_text() == "someone else's file\n"
    assert manager.paths(run_id).log_tail() == ""  # nor shown


def test_queued_runs_start_back_to_back_across_an_app_restart_past_a_broken_one(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    shutil.copy(sample_photo_paths()[0], data)
    before = RunManager(tmp_path / "runs")  # the first app queues three runs, then goes away
    broken, _ = before.enqueue(quick(data=str(data)))
    first, _ = before.enqueue(quick())
    second, _ = before.enqueue(quick())
    shutil.rmtree(data)  # the first queued run's data is gone by the time its turn comes
    before.queue.remove(second)  # as if the app was killed between making it and queueing it
    del before

    after = RunManager(tmp_path / "runs")  # the restarted app picks the queue up
    after.start_queue_worker(every_s=0.3)

    def ended(run_id: str):
        status = after.status(run_id)
        return status if status["state"] in ("finished", "failed", "stopped") else None

    assert poll(lambda: ended(second), TIMEOUT_S, every_s=0.5), after.status(second)
    assert after.status(broken)["state"] == "failed"
    assert "could not start from the queue" in after.status(broken)["error"]
    assert after.status(first)["state"] == "finished" and after.status(second)["state"] == "finished"
    # back to back: the second was launched only after the first had finished
    first_end = after.paths(first).read_status()["updated"]
    second_launch = (after.paths(second).process.stat().st_mtime)
    assert second_launch >= first_end - 1.0
    assert after.queued() == []


def test_the_queue_scans_the_next_runs_data_outside_the_lock(tmp_path, monkeypatch):
    """While the queue reads the next run's (slow) data folder, every status call still answers,
    and the run launches once the scan is done; a run that left the queue meanwhile is not."""
    import threading

    from mae_core import runqueue as queue_module

    manager = RunManager(tmp_path / "runs")
    waiting, _ = manager.enqueue(quick(max_steps=2))
    slow_disk = SlowDisk(queue_module.check_data)  # the real scan, answering when told to
    scanning, release = slow_disk.scanning, slow_disk.release
    monkeypatch.setattr(queue_module, "check_data", slow_disk)
    launched: list[object] = []
    worker = threading.Thread(target=lambda: launched.append(manager.advance_queue()))
    worker.start()
    assert scanning.wait(60)
    answers: list[object] = []
    asker = threading.Thread(target=lambda: answers.extend(
        [manager.status(waiting)["state"], manager.queued(), manager.live_run()]))
    asker.start()
    asker.join(20)  # generous: without the scan in the way this takes milliseconds
    release.set()
    worker.join(TIMEOUT_S)
    assert answers == ["queued", [waiting], None], "a status call waited for the data scan"
    assert launched == [waiting]
    assert poll(lambda: manager.status(waiting)["state"] == "finished", TIMEOUT_S, every_s=0.5)

    gone, _ = manager.enqueue(quick(max_steps=2))
    scanning.clear()
    release.clear()
    worker = threading.Thread(target=lambda: launched.append(manager.advance_queue()))
    worker.start()
    assert scanning.wait(60)
    manager.delete(gone)  # taken out of the queue while its data was being read
    release.set()
    worker.join(TIMEOUT_S)
    assert launched[-1] is None and manager.list() == [manager.status(waiting)]
