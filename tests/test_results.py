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


def test_cpu_description_names_the_widest_vector_extension():
    """Rows' device: two CPU generations a virtual machine names alike ("AMD EPYC") differ by their vector
    extension, which the C kernels' lane width follows."""
    from benchbox.train import cpu_description
    zen5 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n" * 2
    zen3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"
    assert cpu_description(zen5, "x86_64", 2) == "cpu: AMD EPYC x2, avx512"
    assert cpu_description(zen3, "x86_64", 2) == "cpu: AMD EPYC x2, avx2"
    assert cpu_description(arm, "aarch64", 4) == "cpu: aarch64 x4, asimd"
    assert cpu_description("", "x86_64", 1) == "cpu: x86_64 x1"
