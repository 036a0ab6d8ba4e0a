"""ImageNet class names shipped as package data, in transformers' id2label format."""

from __future__ import annotations

from importlib import resources

from convnext_cli.model import labels


def test_imagenet_1k() -> None:
    names = labels.labels_for(1000)
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca"
    assert names[281] == "tabby, tabby cat"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert names[134] == names[517] == "crane"  # ImageNet's own repeat
    assert all(name and name == name.strip() for name in names)


def test_imagenet_22k() -> None:
    names = labels.labels_for(21841)
    assert len(names) == 21841
    assert names[:2] == ["organism, being", "benthos"]
    assert "tabby, tabby cat" in names
    assert all(name and "\t" not in name for name in names)


def test_other_sizes_get_generic_names() -> None:
    assert labels.labels_for(3) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert labels.labels_for(0) == []


def test_dicts() -> None:
    names = ["cat", "dog", "cat"]
    assert labels.id2label_dict(names) == {"0": "cat", "1": "dog", "2": "cat"}
    assert labels.label2id_dict(names) == {"cat": 2, "dog": 1}


def test_files_are_package_data() -> None:
    data = resources.files("convnext_cli.model").joinpath("data")
    for name, lines in (("imagenet-1k.txt", 1000), ("imagenet-22k.txt", 21841)):
        text = data.joinpath(name).read_text(encoding="utf-8")
        assert text.endswith("\n") and "\r" not in text
        assert text.count("\n") == lines


def test_labels_are_a_fresh_list_each_time() -> None:
    first = labels.labels_for(1000)
    first[0] = "changed"
    assert labels.labels_for(1000)[0] == "tench, Tinca tinca"
