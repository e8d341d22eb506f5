"""The real-dataset loaders on small files written in each dataset's real format (no download is possible here)."""
from __future__ import annotations

import calendar
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from puma_ray.data.amazon import load_amazon
from puma_ray.data.mind import load_mind
from puma_ray.data.records import DataError
from puma_ray.data.yelp import load_yelp


def write_jsonl(path, objs, *, gz=False, raw_lines=()):
    """JSON lines as the dumps ship them; raw_lines = {line_index: text} splices in hand-written lines."""
    lines = [json.dumps(o) for o in objs]
    for i, text in dict(raw_lines).items():
        lines.insert(i, text)
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def per_user_split_ok(records: pd.DataFrame):
    """Within each user, every train record is older than every valid one, and valid older than test."""
    rank = {"train": 0, "valid": 1, "test": 2}
    for _, g in records.groupby("user_id"):
        g = g.sort_values(["timestamp", "item_id"])
        assert list(g["split"].map(rank)) == sorted(g["split"].map(rank))


# --------------------------------------------------------------------------------------------------------- amazon
CORE_USERS = [f"AUSER{u:02d}" for u in range(12)]
CORE_ITEMS = [f"B0CORE{i:04d}" for i in range(22)]
T0_MS = 1_600_000_000_000


def review(user, item, rating, ts_ms):
    return {
        "rating": float(rating),
        "title": "Great",
        "text": "Loved it.<br />Would watch again",
        "images": [],
        "asin": item + "V",  # the variant; the loader keys on parent_asin
        "parent_asin": item,
        "user_id": user,
        "timestamp": ts_ms,
        "helpful_vote": 0,
        "verified_purchase": True,
    }


def meta(item, title):
    return {
        "main_category": "Movies & TV",
        "title": title,
        "average_rating": 4.2,
        "rating_number": 100,
        "features": [],
        "description": ["A film."],
        "price": None,
        "images": [],
        "videos": [],
        "store": "Studio",
        "categories": ["Movies & TV"],
        "details": {"Format": "DVD"},
        "parent_asin": item,
        "bought_together": None,
    }


def core_rating(u: int, i: int) -> int:
    return 1 + (u + 2 * i) % 5


def amazon_files(tmp_path, *, gz=True, raw_lines=()):
    reviews = []
    for u, user in enumerate(CORE_USERS):
        for i, item in enumerate(CORE_ITEMS):
            # + 123 ms: the loader floors to seconds
            reviews.append(review(user, item, core_rating(u, i), T0_MS + (u * 100 + i) * 60_000 + 123))
    reviews.append(reviews[3 * 22])  # a verbatim duplicate (AUSER03's first review), as the dumps hold
    for u in range(3):  # a rare item: 3 + 1 ratings < 10, dropped
        reviews.append(review(CORE_USERS[u], "B0RARE", 5, T0_MS + 10**9 + u))
    # AUSERedge has exactly 20 ratings, one on the rare item: once that item goes it has 19 -> dropped (k-core)
    for i in range(19):
        reviews.append(review("AUSERedge", CORE_ITEMS[i], 4, T0_MS + 2 * 10**9 + i * 1000))
    reviews.append(review("AUSERedge", "B0RARE", 2, T0_MS + 2 * 10**9 + 99_000))
    for i in range(5):  # a light user, and an item only it rated
        reviews.append(review("AUSERlight", CORE_ITEMS[i], 3, T0_MS + 3 * 10**9 + i))
    reviews.append(review("AUSERlight", "B0SOLO", 3, T0_MS + 3 * 10**9 + 10))
    metas = [meta(item, f"Film number {i}") for i, item in enumerate(CORE_ITEMS) if i != 6]
    metas[5]["title"] = ""  # empty title -> the id; CORE_ITEMS[6] has no meta line at all -> the id
    metas += [meta("B0RARE", "Rare film"), meta("B0SOLO", "Solo film"), meta("B0OTHER", "Never rated")]
    name = "Movies_and_TV.jsonl.gz" if gz else "Movies_and_TV.jsonl"
    rpath = write_jsonl(tmp_path / name, reviews, gz=gz, raw_lines=raw_lines)
    mpath = write_jsonl(tmp_path / "meta_Movies_and_TV.jsonl", metas)
    return rpath, mpath


def test_amazon_paper_filters_gzip(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=True)
    ds = load_amazon(rpath, mpath)
    r = ds.records
    assert ds.task == "rating" and ds.name == "amazon-Movies_and_TV"
    assert list(ds.users) == CORE_USERS  # light (5), edge (k-core cascade) dropped
    assert sorted(ds.items["item_id"]) == CORE_ITEMS  # rare, solo, never-rated dropped
    assert (r.groupby("user_id").size() == 22).all()  # the duplicate counted once, all 22 < 85 kept
    texts = dict(zip(ds.items["item_id"], ds.items["text"]))
    assert texts[CORE_ITEMS[0]] == "Film number 0"
    assert texts[CORE_ITEMS[5]] == CORE_ITEMS[5] and texts[CORE_ITEMS[6]] == CORE_ITEMS[6]
    row = r[(r["user_id"] == "AUSER04") & (r["item_id"] == CORE_ITEMS[7])].iloc[0]
    assert row["label"] == core_rating(4, 7)
    assert row["timestamp"] == (T0_MS + (4 * 100 + 7) * 60_000) // 1000
    assert r["label"].dtype == np.float32 and r["timestamp"].dtype == np.int64
    # 22 records: round(2.2) = 2 test, 2 valid, 18 train; the test ones are the latest two
    for user, g in r.groupby("user_id"):
        assert g["split"].value_counts().to_dict() == {"train": 18, "valid": 2, "test": 2}
        assert set(g.loc[g["split"] == "test", "item_id"]) == set(CORE_ITEMS[-2:])
    per_user_split_ok(r)
    c = ds.provenance["counts"]
    assert c["raw"] == {"records": 12 * 22 + 1 + 3 + 20 + 6, "users": 14, "items": 24}
    assert c["after_k_core"] == {"records": 12 * 22, "users": 12, "items": 22}
    assert c["items_without_text"] == 2 and c["items_without_text_share"] == round(2 / 22, 4)
    assert ds.provenance["files"] == {"reviews": rpath, "meta": mpath}


def test_amazon_through_fsspec_url(tmp_path):
    """The loaders open paths through fsspec: a memory:// URL (as s3:// would be) reads like a local file."""
    import fsspec

    rpath, mpath = amazon_files(tmp_path, gz=True)
    fs = fsspec.filesystem("memory")
    try:
        for local in (rpath, mpath):
            fs.pipe(f"/puma-test-amazon/{local.rsplit('/', 1)[1]}", open(local, "rb").read())
        url = "memory://puma-test-amazon"
        ds = load_amazon(f"{url}/Movies_and_TV.jsonl.gz", f"{url}/meta_Movies_and_TV.jsonl")
        pd.testing.assert_frame_equal(ds.records, load_amazon(rpath, mpath).records)
    finally:
        fs.rm("/puma-test-amazon", recursive=True)


def test_amazon_keep_latest_and_fractions(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=False)
    ds = load_amazon(rpath, mpath, keep_latest=20, valid_frac=0.0, test_frac=0.25)
    r = ds.records
    assert (r.groupby("user_id").size() == 20).all()
    assert set(r["item_id"]) == set(CORE_ITEMS[2:])  # every user's two oldest cut
    for _, g in r.groupby("user_id"):
        assert g["split"].value_counts().to_dict() == {"train": 15, "test": 5}
    per_user_split_ok(r)


def test_amazon_malformed_line_names_file_and_line(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=True, raw_lines={4: '{"rating": 5.0, "user_id": '})
    with pytest.raises(DataError, match=r"Movies_and_TV\.jsonl\.gz:5: malformed JSON"):
        load_amazon(rpath, mpath)


def test_amazon_missing_key_and_bad_rating(tmp_path):
    bad = review("U", "I", 4, T0_MS)
    del bad["parent_asin"]
    path = write_jsonl(tmp_path / "r.jsonl", [review("U", "I", 4, T0_MS), bad])
    with pytest.raises(DataError, match=r"r\.jsonl:2: missing key 'parent_asin'"):
        load_amazon(path, path)
    path = write_jsonl(tmp_path / "r2.jsonl", [review("U", "I", 7, T0_MS)])
    with pytest.raises(DataError, match=r"r2\.jsonl:1: rating must be a number in 1\.\.5"):
        load_amazon(path, path)


# ----------------------------------------------------------------------------------------------------------- yelp
BUSINESSES = {
    "bizDiner": ("Mike's Diner", 4.5, 120, "Restaurants, Diners"),
    "bizDoc": ("Dr. Smith", 3.0, 1, "Doctors, Health & Medical"),
    "bizPark": ("City Park", 4.0, 40, None),
    "bizBar": ("The Bar", 3.5, 77, "Nightlife, Bars"),
}
TEXTS = {
    "bizDiner": "Mike's Diner (4.5 stars, 120 reviews; Restaurants, Diners)",
    "bizDoc": "Dr. Smith (3.0 stars, 1 review; Doctors, Health & Medical)",
    "bizPark": "City Park (4.0 stars, 40 reviews)",
    "bizBar": "The Bar (3.5 stars, 77 reviews; Nightlife, Bars)",
}


def business(bid, name, stars, count, cats):
    return {
        "business_id": bid,
        "name": name,
        "address": "1 Main St",
        "city": "Tucson",
        "state": "AZ",
        "postal_code": "85701",
        "latitude": 32.2,
        "longitude": -110.9,
        "stars": stars,
        "review_count": count,
        "is_open": 1,
        "attributes": {"WiFi": "u'free'"},
        "categories": cats,
        "hours": {"Monday": "8:0-22:0"},
    }


def yelp_review(k, user, bid, stars, date):
    return {
        "review_id": f"rev{k}",
        "user_id": user,
        "business_id": bid,
        "stars": stars,
        "useful": 0,
        "funny": 0,
        "cool": 0,
        "text": "Nice place",
        "date": date,
    }


def date_of(day: int, minute: int) -> str:
    return (pd.Timestamp("2016-03-09 00:44:15") + pd.Timedelta(days=day, minutes=minute)).strftime("%Y-%m-%d %H:%M:%S")


FILLERS = [f"bizF{j:02d}" for j in range(77)]


def yelp_files(tmp_path, *, biz_raw_lines=()):
    ids = list(BUSINESSES)
    reviews, k = [], 0
    # heavy: 80 reviews -> its latest 75 kept; ok: exactly 25 -> kept; short: 24 -> dropped. One review per
    # (user, business) as Yelp keeps them; the named businesses last (the latest reviews)
    for user, n, named in (("heavy", 80, ids[:3]), ("ok", 25, ids[:2]), ("short", 24, ids[3:])):
        which = FILLERS[:n - len(named)] + named
        for j in range(n):
            reviews.append(yelp_review(k, user, which[j], 1 + j % 5, date_of(j, len(user))))
            k += 1
    rpath = write_jsonl(tmp_path / "yelp_academic_dataset_review.json", reviews)
    biz = [business(b, *BUSINESSES[b]) for b in ids] + [business(f, f"Filler {f}", 3.0, 5, "Shops") for f in FILLERS]
    biz += [business("bizNever", "Nobody", 5.0, 0, None)]
    bpath = write_jsonl(tmp_path / "yelp_academic_dataset_business.json", biz, raw_lines=biz_raw_lines)
    return rpath, bpath


def test_yelp_filters_texts_and_split(tmp_path):
    rpath, bpath = yelp_files(tmp_path)
    ds = load_yelp(rpath, bpath)
    r = ds.records
    assert ds.task == "rating" and list(ds.users) == ["heavy", "ok"]
    assert r.groupby("user_id").size().to_dict() == {"heavy": 75, "ok": 25}
    # bizBar was only reviewed by the dropped user
    texts = dict(zip(ds.items["item_id"], ds.items["text"]))
    assert {b: texts[b] for b in ("bizDiner", "bizDoc", "bizPark")} == {b: TEXTS[b] for b in ("bizDiner", "bizDoc",
                                                                                           "bizPark")}
    assert "bizBar" not in texts and "bizNever" not in texts and set(texts) - set(TEXTS) == set(FILLERS)
    heavy = r[r["user_id"] == "heavy"].sort_values("timestamp")
    expected_first = calendar.timegm(pd.Timestamp(date_of(5, 5)).timetuple())  # its 5 oldest reviews cut
    assert heavy["timestamp"].iloc[0] == expected_first
    assert list(heavy["label"].iloc[:3]) == [1.0, 2.0, 3.0]  # reviews j=5,6,7 have stars 1 + j % 5
    # np.round is half-to-even: 75 -> round(7.5) = 8 each; 25 -> round(2.5) = 2 each
    assert heavy["split"].value_counts().to_dict() == {"train": 59, "valid": 8, "test": 8}
    assert set(heavy["split"].iloc[-8:]) == {"test"}
    ok = r[r["user_id"] == "ok"]
    assert ok["split"].value_counts().to_dict() == {"train": 21, "valid": 2, "test": 2}
    per_user_split_ok(r)
    assert ds.provenance["counts"]["raw"] == {"records": 129, "users": 3, "items": 81}


def test_yelp_malformed_business_line(tmp_path):
    rpath, bpath = yelp_files(tmp_path, biz_raw_lines={1: '{"business_id": "x", "name": }'})
    with pytest.raises(DataError, match=r"yelp_academic_dataset_business\.json:2: malformed JSON"):
        load_yelp(rpath, bpath)


def test_yelp_unknown_business_and_bad_date(tmp_path):
    rpath, _ = yelp_files(tmp_path)
    bpath = write_jsonl(tmp_path / "b.json", [business("bizDiner", *BUSINESSES["bizDiner"])])
    with pytest.raises(DataError, match=r"not in the business file, e\.g\. 'bizDoc'"):
        load_yelp(rpath, bpath)
    path = write_jsonl(tmp_path / "r.json", [yelp_review(0, "u", "bizDiner", 5, "09/03/2016")])
    with pytest.raises(DataError, match=r"r\.json:1: date '09/03/2016'"):
        load_yelp(path, bpath)


# ----------------------------------------------------------------------------------------------------------- mind
NEWS = {"N1": "Storm hits coast", "N2": "Team wins cup", "N3": "Markets rally", "N4": "New phone out",
        "N5": "Recipe: soup", "N6": ""}  # fmt: skip


def news_tsv(tmp_path, extra=""):
    lines = [
        f'{nid}\tnews\tnewsworld\t{title}\tAn "abstract" here\thttps://assets.msn.com/{nid}\t[]\t[]'
        for nid, title in NEWS.items()
    ]
    path = tmp_path / "news.tsv"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return str(path)


BEHAVIORS = [
    "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2 N3\tN4-1 N5-0",
    "2\tU2\t11/11/2019 10:00:00 PM\t\tN1-0 N2-1 N3-0",
    "3\tU1\t11/12/2019 1:00:00 AM\tN1 N2 N3 N4\tN5-1 N6-0 N2-0",
    "4\tU1\t11/13/2019 12:30:00 PM\tN1 N2 N3 N4 N5\tN6-1",
]


def behaviors_tsv(tmp_path, lines=BEHAVIORS):
    folder = tmp_path / "MINDsmall_train"
    folder.mkdir(exist_ok=True)
    path = folder / "behaviors.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def utc(*args) -> int:
    return calendar.timegm((*args, 0, 0, 0))


def test_mind_records_history_and_split(tmp_path):
    ds = load_mind(behaviors_tsv(tmp_path), news_tsv(tmp_path), max_history=2)
    r = ds.records
    assert ds.task == "ctr" and ds.name == "mind-MINDsmall_train"
    assert dict(zip(ds.items["item_id"], ds.items["text"])) == {**NEWS, "N6": "N6"}  # all news; empty title -> id
    got = [
        (row.user_id, row.item_id, row.label, row.timestamp, list(row.history), row.split)
        for row in r.sort_values(["user_id", "timestamp", "item_id"]).itertuples()
    ]
    t1, t3, t4 = utc(2019, 11, 11, 9, 5, 58), utc(2019, 11, 12, 1, 0, 0), utc(2019, 11, 13, 12, 30, 0)
    t2 = utc(2019, 11, 11, 22, 0, 0)
    assert got == [
        # U1: 6 records -> 1 test, 1 valid, 4 train; ties within an impression ordered by news id
        ("U1", "N4", 1.0, t1, ["N2", "N3"], "train"),
        ("U1", "N5", 0.0, t1, ["N2", "N3"], "train"),
        ("U1", "N2", 0.0, t3, ["N3", "N4"], "train"),
        ("U1", "N5", 1.0, t3, ["N3", "N4"], "train"),
        ("U1", "N6", 0.0, t3, ["N3", "N4"], "valid"),
        ("U1", "N6", 1.0, t4, ["N4", "N5"], "test"),
        ("U2", "N1", 0.0, t2, [], "train"),
        ("U2", "N2", 1.0, t2, [], "valid"),
        ("U2", "N3", 0.0, t2, [], "test"),
    ]
    assert ds.provenance["counts"]["impressions"] == 4 and ds.provenance["counts"]["news"] == 6


def test_mind_full_history_by_default(tmp_path):
    ds = load_mind(behaviors_tsv(tmp_path), news_tsv(tmp_path))
    last = ds.records[(ds.records["user_id"] == "U1") & (ds.records["split"] == "test")].iloc[0]
    assert list(last["history"]) == ["N1", "N2", "N3", "N4", "N5"]


@pytest.mark.parametrize("max_history, expected", [(4, ["N1", "N2", "N3"]), (5, ["N1", "N2", "N3"]),
                                                  (2, ["N2", "N3"]), (1, ["N3"])])
def test_mind_short_history_is_kept_whole(tmp_path, max_history, expected):
    """3 clicks with max_history 4 or 5 keep all 3 (they kept 2 and 1: a negative slice start counts from the end)."""
    ds = load_mind(behaviors_tsv(tmp_path), news_tsv(tmp_path), max_history=max_history)
    first = ds.records[(ds.records["user_id"] == "U1") & (ds.records["item_id"] == "N4")].iloc[0]
    assert list(first["history"]) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("5\tU3\t11/13/2019 1:00:00 PM\tN1\tN99-1", r"behaviors\.tsv:5: candidate news id 'N99' is not in news\.tsv"),
        ("5\tU3\t11/13/2019 1:00:00 PM\tN1 N77\tN2-1", r"behaviors\.tsv:5: history news id 'N77' is not in news"),
        ("5\tU3\t11/13/2019 1:00:00 PM\tN1\tN2 N3", r"behaviors\.tsv:5: impression candidate 'N2' lacks a -0/-1"),
        ("5\tU3\t2019-11-13\tN1\tN2-1", r"behaviors\.tsv:5: time '2019-11-13'"),
        ("5\tU3\tN1\tN2-1", r"behaviors\.tsv:5: expected 5 tab-separated fields, got 4"),
    ],
)
def test_mind_bad_behaviors(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_mind(behaviors_tsv(tmp_path, BEHAVIORS + [line]), news_tsv(tmp_path))


def test_mind_bad_news_line(tmp_path):
    with pytest.raises(DataError, match=r"news\.tsv:7: expected 8 tab-separated fields, got 2"):
        load_mind(behaviors_tsv(tmp_path), news_tsv(tmp_path, extra="N7\tsports\n"))


# ----------------------------------------------------------------------------------------------- read mistakes
def test_truncated_gzip_is_one_line(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=True)
    data = Path(rpath).read_bytes()
    Path(rpath).write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(DataError, match=r"Movies_and_TV.jsonl.gz: ends in the middle of its compressed stream"):
        load_amazon(rpath, mpath)


def test_gzip_bytes_under_a_plain_name_is_one_line(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=True)
    plain = tmp_path / "Movies_and_TV.jsonl"
    plain.write_bytes(Path(rpath).read_bytes())
    with pytest.raises(DataError, match=r"Movies_and_TV.jsonl:1: not UTF-8 text"):
        load_amazon(str(plain), mpath)


def test_a_folder_given_as_a_file_is_one_line(tmp_path):
    _, mpath = amazon_files(tmp_path, gz=True)
    with pytest.raises(DataError, match="is a folder; data.paths names files"):
        load_amazon(str(tmp_path), mpath)


def test_utf8_bom_is_ignored(tmp_path):
    folder = tmp_path / "bom"
    folder.mkdir()
    news = news_tsv(folder)
    Path(news).write_bytes(b"\xef\xbb\xbf" + Path(news).read_bytes())  # as Windows editors save a TSV
    ds = load_mind(behaviors_tsv(folder), news)
    assert "N1" in set(ds.items["item_id"])  # the first id is found, not "\ufeffN1"


@pytest.mark.parametrize("name, paths, options, message", [
    ("yelp", ("reviews", "business"), {"min_user_ratings": 5},
     r"data.options.min_user_ratings is not an option of the yelp loader; known: \['min_user_reviews', 'keep_"),
    ("amazon", ("reviews", "meta"), {"valid_frac": 0.2}, "data.options.valid_frac: set data.valid_frac instead"),
    ("mind", ("behaviors", "news"), {"max_history": "ten"}, "data.options.max_history must be an integer, got 'ten'"),
])
def test_loader_options_are_checked_before_reading(tmp_path, name, paths, options, message):
    from puma_ray.config import DataConfig
    from puma_ray.data import load_dataset
    from puma_ray.errors import ConfigError
    cfg = DataConfig(name=name, paths={p: str(tmp_path / "does-not-exist") for p in paths}, options=options)
    with pytest.raises(ConfigError, match=message):
        load_dataset(cfg)


# ------------------------------------------------------------------- wrong kind of file, repeated ratings (issue 15)
def test_amazon_meta_of_another_category_is_refused(tmp_path):
    rpath, _ = amazon_files(tmp_path)
    books = write_jsonl(tmp_path / "meta_Books.jsonl", [meta(f"B0BOOK{i}", f"Book {i}") for i in range(30)]
                        + [meta(item, "A film") for item in CORE_ITEMS[:3]])
    with pytest.raises(DataError, match=r"meta_Books\.jsonl: 19 of 22 rated items \(86%\) have no title in this file"):
        load_amazon(rpath, books)
    # the threshold is the user's: everything may be textless on purpose
    ds = load_amazon(rpath, books, max_textless_share=1.0)
    assert ds.provenance["counts"]["items_without_text"] == 19


def test_amazon_reviews_given_as_meta_are_refused(tmp_path):
    """Review lines have parent_asin and a title too ("Great"): they would load as item texts."""
    rpath, _ = amazon_files(tmp_path, gz=False)
    with pytest.raises(DataError, match=r"Movies_and_TV\.jsonl:1: a review \(user_id, rating\), not product "
                                        r"metadata: are the reviews and meta paths swapped\?"):
        load_amazon(rpath, rpath)


def test_amazon_two_variants_of_one_product_are_one_rating(tmp_path):
    rpath, mpath = amazon_files(tmp_path, gz=False)
    later = review("AUSER03", CORE_ITEMS[2], 1, T0_MS + 9 * 10**9)  # the Blu-ray after the DVD, rated again
    later["asin"] = CORE_ITEMS[2] + "BLURAY"
    with open(rpath, "a") as f:
        f.write(json.dumps(later) + "\n")
    r = load_amazon(rpath, mpath).records
    mine = r[(r["user_id"] == "AUSER03") & (r["item_id"] == CORE_ITEMS[2])]
    assert len(mine) == 1 and mine["label"].iloc[0] == 1.0  # the latest rating stands, in one split only
    assert len(r.drop_duplicates(["user_id", "item_id"])) == len(r)


def test_yelp_rereview_keeps_the_latest_and_repeated_lines_once(tmp_path):
    rpath, bpath = yelp_files(tmp_path)
    lines = Path(rpath).read_text().splitlines()
    again = json.loads(lines[-30])  # one of ok's reviews, reviewed again later with 1 star
    again.update(review_id="rev-again", stars=1, date=date_of(400, 0))
    Path(rpath).write_text("\n".join(lines + [lines[100], lines[100], json.dumps(again)]) + "\n")
    ds = load_yelp(rpath, bpath)
    r = ds.records
    assert len(r.drop_duplicates(["user_id", "item_id"])) == len(r)
    mine = r[(r["user_id"] == again["user_id"]) & (r["item_id"] == again["business_id"])]
    assert len(mine) == 1 and mine["label"].iloc[0] == 1.0
    assert ds.provenance["counts"]["after_dedup"]["records"] == 129


def test_yelp_review_file_as_business_file_is_refused(tmp_path):
    rpath, _ = yelp_files(tmp_path)
    with pytest.raises(DataError, match=r"review\.json:1: a review or tip \(review_id/user_id\), not a business"):
        load_yelp(rpath, rpath)


def test_yelp_businesses_without_names_are_refused(tmp_path):
    rpath, _ = yelp_files(tmp_path)
    nameless = [{"business_id": b, "stars": 3.0} for b in [*BUSINESSES, *FILLERS]]  # e.g. a checkin-like file
    bpath = write_jsonl(tmp_path / "b.json", nameless)
    with pytest.raises(DataError, match=r"b\.json: 80 of 80 rated items \(100%\) have no name in this file"):
        load_yelp(rpath, bpath)


def test_mind_repeated_impression_lines(tmp_path):
    ds = load_mind(behaviors_tsv(tmp_path, BEHAVIORS + [BEHAVIORS[1]]), news_tsv(tmp_path))
    assert len(ds.records) == 9 and ds.provenance["counts"]["repeated_impression_lines_dropped"] == 1
    clash = BEHAVIORS[1].replace("N2-1", "N2-0")
    with pytest.raises(DataError, match=r"behaviors\.tsv:5: impression id '2' appears twice with different content"):
        load_mind(behaviors_tsv(tmp_path, BEHAVIORS + [clash]), news_tsv(tmp_path))


def test_mind_news_without_titles_is_refused(tmp_path):
    news = tmp_path / "news.tsv"
    news.write_text("".join(f"{n}\tnews\tworld\t\t\t\t[]\t[]\n" for n in NEWS), encoding="utf-8")
    with pytest.raises(DataError, match=r"news\.tsv: 6 of 6 rated items \(100%\) have no title"):
        load_mind(behaviors_tsv(tmp_path), str(news))


def test_records_read_in_place_are_named_absolutely(toy_dataset, tmp_path, monkeypatch):
    """A config's relative data path reaches Ray's workers absolute: a Train worker runs in its own working
    directory (the 30k synthetic run's source-store training failed on `runs/.../records.parquet`)."""
    import os

    from puma_ray.config import DataConfig
    from puma_ray.data import records_in_place, save_dataset
    monkeypatch.chdir(tmp_path)
    save_dataset(toy_dataset, "data")
    cfg = DataConfig(name="parquet", paths={"records": "data/records.parquet", "items": "data/items.parquet"})
    path = records_in_place(cfg)
    assert path == str(tmp_path / "data" / "records.parquet") and os.path.isabs(path)
