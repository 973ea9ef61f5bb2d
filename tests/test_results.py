import multiprocessing as mp

from benchbox import results


def _writer(path, worker, n):
    for i in range(n):
        results.append_rows(path, [{"run_id": f"{worker}-{i}", "status": "ok", "value": i * 0.5}])


def test_concurrent_appends_keep_every_row(tmp_path):
    path = tmp_path / "runs.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = results.read_rows(path)
    assert sorted(r["run_id"] for r in rows) == sorted(f"{w}-{i}" for w in range(4) for i in range(25))
    assert not list(tmp_path.glob(".tmp*"))  # no temporary file left behind


def test_new_columns_extend_the_header(tmp_path):
    path = tmp_path / "r.csv"
    results.append_rows(path, [{"a": 1, "b": 2}])
    results.append_rows(path, [{"a": 3, "c": 4}])
    assert results.read_rows(path) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]
