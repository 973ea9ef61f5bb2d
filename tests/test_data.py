import hashlib
import zipfile

import numpy as np
import pytest

from benchbox import data
from benchbox.data import DataError
from conftest import write_seqs


def test_parse_sequence_file_and_cache(tmp_path):
    p = write_seqs(tmp_path / "d.txt", [[1, 2, 3, 4], [5, 2, 6], [7, 8]])
    d = data.parse_sequence_file(p)
    assert d.n_users == 2 and d.dropped_users == 1  # a 2-item user cannot give train/valid/test
    assert d.user(0).tolist() == [1, 2, 3, 4] and d.user(1).tolist() == [5, 2, 6]
    assert d.n_items == 6
    assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    again = data.parse_sequence_file(p)  # from the cache
    assert np.array_equal(again.items, d.items) and np.array_equal(again.offsets, d.offsets)


@pytest.mark.parametrize("text,msg", [
    ("1 2 3 4\n2 5 x 7\n", r"d.txt:2: malformed line: 'x'"),
    ("1 2 3 4\n2\n", r"d.txt:2: malformed line: a user id with no items"),
    ("1 2 0 4\n", r"d.txt:1: malformed line: ids start at 1"),
    ("", "empty data file"),
])
def test_malformed_files_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "d.txt"
    p.write_text(text)
    with pytest.raises(DataError, match=msg):
        data.parse_sequence_file(p)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"no data for 'beauty': looked in .*beauty/Beauty.txt.*--download"):
        data.load("beauty", str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        data.load("nope")
    with pytest.raises(DataError, match="not found"):
        data.load(str(tmp_path / "absent.txt"))


def test_cards_are_complete():
    cards = data.load_cards()
    assert {"ml-1m", "beauty", "electronics", "sports", "toys"} <= set(cards)
    assert cards["ml-1m"].max_len == 200 and cards["beauty"].max_len == 50
    assert "sample" in cards["electronics"].title.lower() and "2018" in cards["electronics"].title
    for c in cards.values():
        assert c.description and c.offline_file and c.filtering and len(c.offline_sha256) == 64
        assert c.download["url"].startswith("http")


def test_shared_offline_copies_match_their_cards(shared_data):
    for name, card in data.load_cards().items():
        d = data.load(name, str(shared_data))
        assert d.sha256 == card.offline_sha256, name
    assert data.load("ml-1m", str(shared_data)).stats()["interactions"] == 1_000_209
    assert data.load("beauty", str(shared_data)).stats()["users"] == 22_363


def test_synthetic_is_deterministic_and_structured():
    a, b, c = data.synthetic(seed=3), data.synthetic(seed=3), data.synthetic(seed=4)
    assert a.sha256 == b.sha256 and np.array_equal(a.items, b.items)
    assert a.sha256 != c.sha256
    # learnable structure: the most frequent successor of an item is far above chance
    nxt = {}
    for u in range(a.n_users):
        s = a.user(u)
        for x, y in zip(s[:-1], s[1:]):
            nxt.setdefault(x, []).append(y)
    top_share = np.mean([np.bincount(v).max() / len(v) for v in nxt.values() if len(v) >= 20])
    assert top_share > 0.15  # uniform over 500 items would be ~0.002
    for u in range(a.n_users):  # one interaction per (user, item)
        assert len(set(a.user(u).tolist())) == len(a.user(u))


def test_movielens_and_amazon_raw_parsing(tmp_path):
    # ratings.dat: user 1 rates movies 30, 10 (tie at t=5, file order kept), 20
    (tmp_path / "ratings.dat").write_text("1::20::5::9\n1::30::3::5\n1::10::4::5\n2::10::1::1\n2::20::1::2\n2::30::1::3\n")
    seqs = data.read_movielens_ratings(tmp_path / "ratings.dat")
    # items numbered by MovieID rank: 10 -> 1, 20 -> 2, 30 -> 3
    assert [s.tolist() for s in seqs] == [[3, 1, 2], [1, 2, 3]]
    # amazon: 2-core drops item "z" (one rating) and then user "c" (left with one)
    rows = ["a,x,5,10", "a,y,5,5", "b,x,4,1", "b,y,4,2", "c,x,1,3", "c,z,1,4"]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    seqs = data.read_amazon_ratings_csv(tmp_path / "r.csv", core=2)
    assert [s.tolist() for s in seqs] == [[1, 2], [2, 1]]  # a: y then x; b: x then y
    (tmp_path / "bad.csv").write_text("a,x,5\n")
    with pytest.raises(DataError, match="bad.csv:1: malformed"):
        data.read_amazon_ratings_csv(tmp_path / "bad.csv")


def test_official_download_path_with_checksum(tmp_path, monkeypatch):
    """The download code end to end on a local file:// URL: fetch, verify, convert, cache."""
    lines = "".join(f"{u}::{m}::4::{t}\n" for u in (1, 2) for t, m in enumerate((5, 7, 9, 11)))
    z = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("ml-1m/ratings.dat", lines)
    sha = hashlib.sha256(z.read_bytes()).hexdigest()
    card = data.Card(name="tiny", title="t", description="d", offline_file="tiny/x.txt", max_len=5, filtering="none",
                     download={"url": z.as_uri(), "sha256": sha, "format": "movielens_zip", "member": "ml-1m/ratings.dat"})
    out = data.fetch_official(card)
    d = data.parse_sequence_file(out)
    assert d.n_users == 2 and d.user(0).tolist() == [1, 2, 3, 4]
    bad = data.Card(**{**card.__dict__, "name": "tiny2", "download": {**card.download, "sha256": "0" * 64}})
    with pytest.raises(DataError, match="checksum mismatch"):
        data.fetch_official(bad)
