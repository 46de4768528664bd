"""data/items.py: an item side table joined to the events by id; its columns become event fields (in the events,
the tokenizer's codes and the aggregates), bad input is named by file, row and column, MovieLens gets its own."""

from __future__ import annotations

import polars as pl
import pytest

from conftest import write_lines
from pantherseq.data.schema import load_dataset_config
from pantherseq.data.sequences import Sequences
from pantherseq.data.sources import load_source, recbole_ml100k
from pantherseq.errors import ConfigError, DataError
from pantherseq.eval.representation import aggregate_features
from pantherseq.predict import read_events
from pantherseq.prepare import prepare
from pantherseq.run import RunDir

CONFIG = """
name = "shop"
source = "csv"
[columns]
user_id = "who"
timestamp = "at"
[[fields]]
name = "item"
column = "sku"
[[fields]]
name = "brand"
[[fields]]
name = "price"
kind = "numeric"
column = "list_price"
bins = 2
min_value = 0
[tokenizer]
fields = ["item"]
[split]
kind = "leave_last_out"
[items]
path = "{items}"
key = "sku"
on = "item"
fields = ["brand", "price"]
"""
ITEMS = ["sku,brand,list_price", "a,acme,10", "b,bolt,20.5", "c,acme,3"]


def _events(path, n_users=4, per_user=6):
    rows = ["who,at,sku"]
    for u in range(n_users):
        for i in range(per_user):
            rows.append(f"u{u},2024-01-{1 + i:02d}T10:0{u}:00,{'abcd'[(u + i) % 4]}")
    return write_lines(path, rows)


def _config(tmp_path, items_lines=ITEMS, extra=""):
    items = write_lines(tmp_path / "items.csv", items_lines)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(items=items) + extra)
    return load_dataset_config("csv", cfg, data=str(_events(tmp_path / "events.csv")))


def test_item_fields_become_event_fields(tmp_path):
    cfg = _config(tmp_path)
    report = prepare(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert report["items"] == {"items": 3, "fields": ["brand", "price"], "events_unmatched": 6}  # item d
    events = run.read_events()
    by_item = dict(events.select("item", "brand").unique().iter_rows())
    assert by_item == {"a": "acme", "b": "bolt", "c": "acme", "d": None}
    assert events.filter(pl.col("item") == "b")["price"].unique().to_list() == [20.5]
    seq = Sequences.load(run.sequences)
    brand = seq.field_names.index("brand")
    d = (events["item"] == "d").to_numpy()
    assert (seq.codes[d, brand] == 0).all() and (seq.codes[~d, brand] > 0).all()  # unmatched -> field UNK
    assert pl.read_parquet(run.items).columns == ["sku", "brand", "list_price"]
    _, _, names = aggregate_features(run)
    assert "brand=acme" in names and "price_mean" in names
    # predict reads the item fields from the run's copy of the table: the file needs only the item id
    new = write_lines(tmp_path / "new.csv", ["who,at,sku", "z,2024-02-01T10:00:00,b", "z,2024-02-02T10:00:00,c"])
    assert read_events(run, new)["brand"].to_list() == ["bolt", "acme"]


def test_set_valued_item_field_gives_each_label_its_share(tmp_path):
    """A field with a `separator` holds sets of labels: one value for the token and field codes, one share
    per label in the aggregates (over the events whose item the table holds)."""
    items = ["sku,brand,list_price,tags", "a,acme,10,red blue", "b,bolt,20.5,blue", "c,acme,3,green"]
    cfg = _config(tmp_path, items, '[[fields]]\nname = "tags"\nseparator = " "\nrequired = false\n')
    cfg.items.fields = ["brand", "price", "tags"]
    prepare(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    seq = Sequences.load(run.sequences)
    assert len(set(seq.codes[:, seq.field_names.index("tags")].tolist())) == 4  # 3 sets + UNK (item d)
    _, X, names = aggregate_features(run)
    assert {"tags=red", "tags=blue", "tags=green"} <= set(names) and "tags=red blue" not in names
    # user u0 rates a b c d a b: of the 5 events with tags, blue 4, red 2, green 1
    assert X[0, [names.index(f"tags={t}") for t in ("blue", "red", "green")]].tolist() == pytest.approx(
        [0.8, 0.4, 0.2])


def test_separator_is_for_categorical_fields():
    with pytest.raises(ConfigError, match="separator"):
        load_dataset_config("simulated", overrides=['fields=[{name = "amount", kind = "numeric", separator = " "}]'])


@pytest.mark.parametrize(("lines", "message"), [
    ([ITEMS[0], "a,acme,ten"], "row 1, column 'list_price'"),
    ([ITEMS[0], "a,acme,-1"], "row 1, column 'list_price'"),
    ([ITEMS[0], "a,acme,1", "a,bolt,2"], "duplicate item id"),
    ([ITEMS[0], "a,,1"], "row 1, column 'brand'"),
    (["sku,brandd,list_price", "a,acme,1"], "column 'brand'"),
])
def test_bad_item_tables_name_file_row_and_column(tmp_path, lines, message):
    cfg = _config(tmp_path, lines)
    with pytest.raises(DataError, match=message) as err:
        load_source(cfg)
    assert "items.csv" in str(err.value) and "\n" not in str(err.value)


def test_bad_item_rows_dropped(tmp_path):
    cfg = _config(tmp_path, [*ITEMS, "e,x,oops", "a,again,1"])
    cfg.bad_rows = "drop"
    loaded = load_source(cfg)
    assert sorted(loaded.items["_item"].to_list()) == ["a", "b", "c"]
    assert loaded.events.filter(pl.col("item") == "a")["brand"].unique().to_list() == ["acme"]


def test_items_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="items.on"):
        load_dataset_config("simulated", overrides=['items.fields=["amount"]', "items.on=hour"])
    with pytest.raises(ConfigError, match="not categorical or numeric"):
        load_dataset_config("simulated", overrides=['items.fields=["hour"]', "items.on=merchant_id"])
    with pytest.raises(ConfigError, match="items.fields"):
        load_dataset_config("simulated", overrides=["items.on=merchant_id"])
    cfg = load_dataset_config("simulated", overrides=['items.fields=["category"]', "items.on=merchant_id"])
    with pytest.raises(ConfigError, match="items.path"):
        load_source(cfg)


def test_movielens_u_item_folder(tmp_path):
    write_lines(tmp_path / "u.data", ["1\t10\t4\t881250949", "1\t11\t3\t881250950", "2\t10\t5\t881250951"])
    flags = ["0"] * 19
    action_romance = list(flags)
    action_romance[1] = action_romance[14] = "1"
    write_lines(tmp_path / "u.item", [f"10|A (1994)|01-Jan-1994||http://x|{'|'.join(action_romance)}",
                                      f"11|B|unknown||http://y|{'|'.join(['1'] + flags[1:])}"])
    ev = load_source(load_dataset_config("movielens100k", data=str(tmp_path))).events.sort("item")
    assert ev["genre"].to_list() == ["Action Romance", "Action Romance", "unknown"]  # the whole set
    assert ev["release_year"].to_list() == [1994.0, 1994.0, None]


def test_movielens_default_has_genre_and_year():
    if recbole_ml100k() is None:
        pytest.skip("recbole is not installed (make setup installs it with --no-deps)")
    loaded = load_source(load_dataset_config("movielens100k"))
    ev = loaded.events
    assert loaded.item_stats == {"items": 1682, "fields": ["genre", "release_year"], "events_unmatched": 0}
    toy = ev.filter(pl.col("item") == "1").row(0, named=True)
    assert toy["genre"] == "Animation Children's Comedy" and toy["release_year"] == 1995.0
    assert ev["genre"].n_unique() == 216 and ev["release_year"].null_count() > 0  # item 267 has no year
    labels = ev["genre"].str.split(" ").explode(empty_as_null=True).unique()
    assert labels.len() == 19 and "Romance" in labels.to_list()
