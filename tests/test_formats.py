"""Users' own files: dense ids, interaction logs, k-core, user cards, and every bad input a clean error."""
import json
import subprocess
import sys

import numpy as np
import pytest

import benchbox
from benchbox import cli, data
from benchbox.formats import DataError, k_core
from conftest import ROOT

TINY = dict(epochs=1, d_model=8, n_layers=1, batch_size=64, eval_neg=1, train_neg=1, log=None)


def _seqs(d):
    return [d.user(u).tolist() for u in range(d.n_users)]


def _mapping(d):
    out = {"user": {}, "item": {}}
    for line in data.mapping_path(d).read_text().splitlines()[1:]:
        kind, dense, raw = line.split("\t")
        out[kind][int(dense)] = raw
    return out


def test_raw_sparse_ids_become_dense(tmp_path):
    p = tmp_path / "raw.txt"
    p.write_text("10 5 99999999999 7 5\n20 7 5 9 31\n30 9 99999999999 7 5\n")
    d = data.parse_file(p)
    assert d.n_items == 5 and d.remapped and d.raw_items == 5 and d.raw_users == 3
    # first-seen order: 5 -> 1, 99999999999 -> 2, 7 -> 3, 9 -> 4, 31 -> 5; users keep line order
    assert _seqs(d) == [[1, 2, 3, 1], [3, 1, 4, 5], [4, 2, 3, 1]]
    m = _mapping(d)
    assert m["item"] == {1: "5", 2: "99999999999", 3: "7", 4: "9", 5: "31"} and m["user"] == {0: "10", 1: "20", 2: "30"}
    res = benchbox.run(mixer="gru", dataset=str(p), results_dir=tmp_path / "res", **TINY)
    assert res.row["n_items"] == 5 and res.row["raw_items"] == 5 and res.row["ids_remapped"] is True
    assert len(res.row["eval_sha256"]) == 64


def test_gaps_are_closed_and_dense_files_are_kept(tmp_path):
    """Ids with gaps would be never-clicked items drawn as easy negatives: they are renumbered. Ids that
    are exactly 1..n stay as they are (the offline copies give the arrays they always gave)."""
    p = tmp_path / "g.txt"
    p.write_text("1 30 10 20\n2 20 30 10\n")
    d = data.parse_file(p)
    assert d.n_items == 3 and _seqs(d) == [[1, 2, 3], [3, 1, 2]] and d.remapped
    q = tmp_path / "dense.txt"
    q.write_text("1 3 1 2\n2 2 3 1\n")
    e = data.parse_file(q)
    assert _seqs(e) == [[3, 1, 2], [2, 3, 1]] and not e.remapped


def test_ratings_dat_sorted_by_time_with_file_order_ties(tmp_path):
    p = tmp_path / "ratings.dat"
    p.write_text("7::100::5::30\n7::200::3::10\n8::200::4::5\n7::300::1::30\n8::100::2::6\n7::400::2::20\n8::300::2::7\n")
    d = data.parse_file(p)
    # items first seen: 100 -> 1, 200 -> 2, 300 -> 3, 400 -> 4; user 7 by time: 200(10) 400(20) 100(30) 300(30, later in file)
    assert _seqs(d) == [[2, 4, 1, 3], [2, 1, 3]]
    assert d.raw_users == 2 and d.raw_items == 4


@pytest.mark.parametrize("name,text", [
    ("log.csv", "userId,movieId,rating,timestamp\nu1,m1,5,3\nu1,m2,5,1\nu2,m2,4,2\nu1,m3,2,2\nu2,m3,1,4\nu2,m1,1,9\n"),
    ("log.tsv", "user\titem\ttime\nu1\tm1\t3\nu1\tm2\t1\nu2\tm2\t2\nu1\tm3\t2\nu2\tm3\t4\nu2\tm1\t9\n"),
    ("log.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tm1\t5\t3\nu1\tm2\t5\t1\n"
                  "u2\tm2\t4\t2\nu1\tm3\t2\t2\nu2\tm3\t1\t4\nu2\tm1\t1\t9\n"),
    ("dates.csv", "reviewerID,asin,date\nu1,m1,2020-01-03\nu1,m2,2020-01-01\nu2,m2,2020-01-02\nu1,m3,2020-01-02\n"
                  "u2,m3,2020-01-04\nu2,m1,2020-01-09\n"),
])
def test_interaction_logs_with_headers(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    d = data.parse_file(p)
    assert _seqs(d) == [[2, 3, 1], [2, 3, 1]]  # m1 -> 1, m2 -> 2, m3 -> 3 (first seen); each user by time


def test_columns_name_unrecognised_headers(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("who,what,when\na,x,2\na,y,1\na,z,3\n")
    with pytest.raises(DataError, match=r"no user and no item column in the header \(who, what, when\).*--columns"):
        data.parse_file(p)
    d = data.parse_file(p, columns={"user": "who", "item": "what", "time": "when"})
    assert _seqs(d) == [[2, 1, 3]]
    with pytest.raises(DataError, match="no column 'whom'"):
        data.parse_file(p, columns={"user": "whom", "item": "what"})


def test_k_core_iterates_until_stable():
    # 2-core: the first pass removes item 3 (one user), which leaves user 2 with one interaction; only the
    # second pass removes it
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([1, 2, 1, 2, 2, 3])
    keep = k_core(users, items, 2)
    assert keep.tolist() == [True, True, True, True, False, False]


def test_kcore_and_dedup_options(tmp_path):
    p = tmp_path / "ratings.dat"
    lines = [f"{u}::{i}::1::{t}" for t, (u, i) in enumerate([(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1),
                                                            (3, 2), (3, 3), (4, 1), (4, 9), (1, 1)])]
    p.write_text("\n".join(lines) + "\n")
    assert data.parse_file(p).n_users == 3  # user 4 has 2 items: too short for train/validation/test
    d = data.parse_file(p, kcore=3)
    assert d.n_users == 3 and d.n_items == 3 and d.settings == "kcore=3"
    assert _seqs(d)[0] == [1, 2, 3, 1]
    assert _seqs(data.parse_file(p, kcore=3, dedup=True))[0] == [1, 2, 3]
    with pytest.raises(DataError, match="the 5-core removes every interaction"):
        data.parse_file(p, kcore=5)


def test_user_card_in_data_dir_registers_a_dataset(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ratings.dat").write_text(
        "".join(f"{u}::{i}::1::{u * 10 + i}\n" for u in range(1, 30) for i in range(1, 9) if (u + i) % 4))
    (tmp_path / "mine.toml").write_text('name = "mine"\ntitle = "My log"\ndescription = "test"\n'
                                        'offline_file = "mine/ratings.dat"\nmax_len = 20\nfiltering = "3-core"\nkcore = 3\n')
    d = data.load("mine", str(tmp_path))
    assert d.max_len == 20 and d.settings == "kcore=3" and d.n_users == 29
    assert cli.main(["datasets", "--data-dir", str(tmp_path)]) == 0
    assert "mine" in capsys.readouterr().out
    res = benchbox.run(mixer="gru", dataset="mine", data_dir=str(tmp_path), results_dir=None, **TINY)
    assert res.row["dataset"] == "mine" and res.row["n_users"] == 29
    (tmp_path / "bad.toml").write_text('name = "bad"\n')
    with pytest.raises(DataError, match=r"bad.toml: missing 5 required positional arguments: 'title'.*\(needs name, title, description, offline_file, max_len, filtering\)"):
        data.load_cards(tmp_path)
    (tmp_path / "bad.toml").write_text('name = "ml-1m"\ntitle = "x"\ndescription = ""\noffline_file = "x"\n'
                                       'max_len = 5\nfiltering = ""\n')
    with pytest.raises(DataError, match="name 'ml-1m' is taken"):
        data.load_cards(tmp_path)


@pytest.mark.parametrize("name,content,msg", [
    ("seq.txt", b"1 2 3 4\n2 3 x 5\n", "seq.txt:2: malformed line: 'x' is not an integer id"),
    ("seq.txt", b"1 2 3 4\n2 3 99999999999999999999 5\n", "seq.txt:2: id 99999999999999999999 is out of the 64-bit range"),
    ("seq.txt", b"1 2 3 4\n1 5 6 7\n", "user 1 has more than one line"),
    ("log.csv", b"user,item,time\na,b,1\na,c,2,9\n", "malformed line: Error tokenizing data"),
    ("log.csv", b"user,item,time\na,b,1\n,c,2\n", "log.csv:3: empty user id"),
    ("log.csv", b"user,item,time\na,b,1\na,c,soon\n", "log.csv:3: timestamp 'soon' is neither a number nor a date"),
    ("log.csv", b"user,product\na,b\n", "no item column in the header"),
    ("log.csv", b"user,item,time\na,b,1\n", "no user has the 3 items"),
    ("data.bin", b"\x00\x01\x02binary\x00" * 20, "looks like a binary file"),
    ("latin.csv", "user,item,time\nJosé,b,1\n".encode("latin-1"), "latin.csv:2: not UTF-8 text"),
    ("empty.txt", b"\n\n", "empty data file"),
    ("ratings.dat", b"1::2\n", "2 fields; expected user::item::rating::timestamp"),
])
def test_bad_input_is_one_clean_line(tmp_path, capsys, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    code = cli.main(["run", "--mixer", "gru", "--dataset", str(p), "--results-dir", str(tmp_path / "res"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "res" / "runs.csv").exists()


def test_kcore_that_removes_everything_via_cli(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("user,item,time\n" + "".join(f"u{u},i{u}{k},{k}\n" for u in range(5) for k in range(4)))
    assert cli.main(["run", "--mixer", "gru", "--dataset", str(p), "--kcore", "2", "--results-dir", ""]) == 2
    assert "the 2-core removes every interaction" in capsys.readouterr().err


def test_corrupted_caches_are_rebuilt_with_a_warning(tmp_path, capsys):
    p = tmp_path / "raw.txt"
    p.write_text("".join(f"{u} " + " ".join(str(1000 + (u * 7 + k) % 40) for k in range(8)) + "\n" for u in range(1, 40)))
    first = benchbox.run(mixer="gru", dataset=str(p), results_dir=None, **TINY)
    d = data.parse_file(p)
    cached = data.cache_dir() / "processed" / f"{d.cache_key}-v{data.PARSE_VERSION}.npz"
    cached.write_bytes(cached.read_bytes()[:200])  # truncated
    again = data.parse_file(p)
    assert "is corrupted" in capsys.readouterr().err
    assert np.array_equal(again.items, d.items) and np.array_equal(again.offsets, d.offsets)
    for f in (data.cache_dir() / "eval").glob(f"{d.cache_key}-*.npz"):  # flip bytes inside the arrays
        raw = bytearray(f.read_bytes())
        raw[-200:-190] = b"\xff" * 10
        f.write_bytes(bytes(raw))
    second = benchbox.run(mixer="gru", dataset=str(p), results_dir=None, **TINY)
    assert "evaluation candidates" in capsys.readouterr().err
    assert second.row["eval_sha256"] == first.row["eval_sha256"]  # rebuilt: the same candidates again
    assert second.metrics == first.metrics


def test_one_million_line_log_parses_in_bounded_memory(tmp_path):
    """A 1,000,000-interaction ratings.dat in a fresh process: the parse's peak memory stays bounded
    (a measured figure, not a timing: the limit is generous for slow machines)."""
    p = tmp_path / "ratings.dat"
    rng = np.random.default_rng(0)
    users, items = rng.integers(1, 5001, 1_000_000), rng.integers(1, 20001, 1_000_000) * 13
    with open(p, "w") as f:
        f.writelines(f"{u}::{i}::4::{t}\n" for t, (u, i) in enumerate(zip(users.tolist(), items.tolist())))
    code = ("import resource, sys; from benchbox import data; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"d = data.parse_file({str(p)!r}); "
            "print(d.stats()['interactions'], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    n, extra_mb = map(int, out.stdout.split())
    assert n == 1_000_000 and extra_mb < 400, out.stdout


def test_nothing_is_unpickled():
    """No loader of data or cache files may unpickle (np.load with pickles, torch.load, pickle)."""
    for f in list((ROOT / "benchbox").glob("*.py")) + list((ROOT / "mixers").glob("*.py")):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load(" not in text and "allow_pickle=True" not in text, f.name
        for line in text.splitlines():
            if "np.load(" in line:
                assert "allow_pickle=False" in line, f"{f.name}: {line.strip()}"
