"""Importers of the RxRx1, RxRx3-core and JUMP cpg0016 layouts from tiny fixtures written here, the channel
registry, and a test per bad-input case (one-line error naming the item, no store left behind)."""

import zlib

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import tifffile

from vitally_jax.data.channels import CANONICAL, canonical_name, canonical_order, conform
from vitally_jax.data.importers import import_jump, import_rxrx, parse_well
from vitally_jax.data.store import ImageStore
from vitally_jax.errors import DataError

H, W = 24, 20


def _img(seed, dtype=np.uint8, hi=256):
    return np.random.default_rng(seed).integers(0, hi, (H, W), dtype=dtype)


def write_rxrx1(root, sites=(1, 2), with_dataset=True):
    """metadata.csv + {dataset}/{experiment}/Plate{plate}/{well}_s{site}_w{c}.png; returns (csv, images)."""
    rows, imgs = [], {}
    wells = [
        ("HEPG2-01", "1", "B02", "treatment", "sirna-7"),
        ("HEPG2-01", "1", "C03", "negative_control", "EMPTY"),
        ("U2OS-02", "2", "B02", "positive_control", "sirna-1108"),
        ("U2OS-02", "2", "AB10", "treatment", "sirna-7"),
    ]
    for k, (exp, plate, well, wt, sirna) in enumerate(wells):
        for s in sites:
            rows.append(
                dict(
                    site_id=f"{exp}_{plate}_{well}_{s}",
                    well_id=f"{exp}_{plate}_{well}",
                    cell_type=exp[:4],
                    dataset="train",
                    experiment=exp,
                    plate=plate,
                    well=well,
                    site=s,
                    well_type=wt,
                    sirna=sirna,
                    sirna_id=k,
                )
            )
            d = root / ("train" if with_dataset else "") / exp / f"Plate{plate}"
            d.mkdir(parents=True, exist_ok=True)
            chans = [_img(100 * k + 10 * s + c) for c in range(1, 7)]
            imgs[f"{exp}_{plate}_{well}_s{s}"] = np.stack(chans, -1)
            for c, im in enumerate(chans, 1):
                (d / f"{well}_s{s}_w{c}.png").write_bytes(imagecodecs.png_encode(im))
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root / "metadata.csv", imgs


def write_rxrx3_core(root):
    rows, imgs = [], {}
    wells = [
        ("gene-001", "1", "AA02", "TP53", "", "", "CRISPR"),
        ("gene-001", "1", "A03", "EMPTY_control", "", "", "CRISPR"),
        ("compound-003", "2", "B05", "", "cpd-123", "0.25", "COMPOUND"),
        ("compound-003", "2", "B06", "", "cpd-123", "2.5", "COMPOUND"),
    ]
    for k, (exp, plate, addr, gene, treat, conc, pt) in enumerate(wells):
        rows.append(
            dict(
                well_id=f"{exp}_{plate}_{addr}",
                experiment_name=exp,
                plate=plate,
                address=addr,
                gene=gene,
                treatment=treat,
                SMILES="",
                concentration=conc,
                perturbation_type=pt,
                cell_type="HUVEC",
            )
        )
        d = root / exp / f"Plate{plate}"
        d.mkdir(parents=True, exist_ok=True)
        chans = [_img(1000 + 10 * k + c) for c in range(1, 7)]
        imgs[f"{exp}_{plate}_{addr}_s1"] = np.stack(chans, -1)
        for c, im in enumerate(chans, 1):
            (d / f"{addr}_s1_{c}.jp2").write_bytes(imagecodecs.jpeg2k_encode(im, level=0))  # lossless
    pd.DataFrame(rows).to_csv(root / "metadata_rxrx3_core.csv", index=False)
    return root / "metadata_rxrx3_core.csv", imgs


def write_jump(root, dtype=np.uint16):
    """load_data CSV with relative PathName folders; channels written in the CSV order DNA, ER, RNA, AGP, Mito."""
    rows, raw = [], {}
    hi = 4096 if dtype == np.uint16 else 256
    for p, plate in enumerate(["BR00117010", "BR00117011"]):
        d = root / "images" / plate
        d.mkdir(parents=True, exist_ok=True)
        for well in ["A01", "P24"]:
            for site in (1, 2):
                row = dict(
                    Metadata_Source="source_4",
                    Metadata_Batch=f"batch{p}",
                    Metadata_Plate=plate,
                    Metadata_Well=well,
                    Metadata_Site=site,
                )
                for c, ch in enumerate(["DNA", "ER", "RNA", "AGP", "Mito"]):
                    im = _img(zlib.crc32(f"{plate}{well}{site}{c}".encode()), dtype, hi) + (
                        p * 200 if dtype == np.uint16 else 0
                    )
                    name = f"r01c01f{site:02d}p01-ch{c + 1}sk1fk1fl1_{well}.tiff"
                    tifffile.imwrite(d / name, im.astype(dtype))
                    raw[(plate, well, site, ch)] = im.astype(dtype)
                    row[f"FileName_Orig{ch}"] = name
                    row[f"PathName_Orig{ch}"] = f"images/{plate}"
                rows.append(row)
    pd.DataFrame(rows).to_csv(root / "load_data.csv", index=False)
    return root / "load_data.csv", raw


def _only(tmp_path, *names):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in names) == []


@pytest.mark.parametrize("with_dataset", [True, False])
def test_rxrx1_png(tmp_path, with_dataset):
    csv, imgs = write_rxrx1(tmp_path / "rxrx1", with_dataset=with_dataset)
    st = ImageStore.open(import_rxrx(csv, tmp_path / "rxrx1", tmp_path / "store"))
    assert st.channel_names == list(CANONICAL) and st.shape == (8, H, W, 6)
    m = st.metadata
    for i, iid in enumerate(m.image_id):
        np.testing.assert_array_equal(st.read(i), imgs[iid])
    assert m.image_id[0] == "HEPG2-01_1_B02_s1" and m.well_id[0] == "HEPG2-01_1_B02"
    last = m.iloc[-1]
    assert (last.well_row, last.well_col, last.site) == (28, 10, 2)  # AB10
    assert m.control_type.tolist()[::2] == ["", "negative", "positive", ""]
    assert m.perturbation_type.tolist()[::2] == ["gene", "control", "control", "gene"]
    assert m.perturbation[0] == "sirna-7" and m.experiment.nunique() == 2
    assert st.attrs["source"] == "rxrx1"


def test_rxrx3_core_jpeg2000(tmp_path):
    csv, imgs = write_rxrx3_core(tmp_path / "rx3")
    st = ImageStore.open(import_rxrx(csv, tmp_path / "rx3", tmp_path / "store"))
    m = st.metadata
    for i, iid in enumerate(m.image_id):
        np.testing.assert_array_equal(st.read(i), imgs[iid])
    assert m.perturbation.tolist() == ["TP53", "EMPTY_control", "cpd-123", "cpd-123"]
    assert m.perturbation_type.tolist() == ["gene", "control", "compound", "compound"]
    assert m.is_control.tolist() == [False, True, False, False]
    np.testing.assert_allclose(m.concentration.to_numpy()[2:], [250.0, 2500.0])  # uM -> nM
    assert np.isnan(m.concentration[0]) and (m.well_row[0], m.well_col[0]) == (27, 2)


def test_jump_16bit_per_plate_percentile_rule(tmp_path):
    csv, raw = write_jump(tmp_path / "jump")
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["BR00117010"] * 2 + ["BR00117011"] * 2,
            "Metadata_Well": ["A01", "P24"] * 2,
            "perturbation": ["JCP2022_033924", "JCP2022_000001", "JCP2022_033924", "JCP2022_000002"],
            "concentration": [np.nan, 10000.0, np.nan, 5000.0],
        }
    )
    st = ImageStore.open(import_jump(csv, tmp_path / "store", perturbations=table))
    assert st.channel_names == ["DNA", "ER", "Actin", "RNA", "Mito"]  # AGP -> Actin, canonical order
    m = st.metadata
    assert m.experiment.tolist() == ["batch0"] * 4 + ["batch1"] * 4
    assert m.is_control.tolist() == [True, True, False, False] * 2 and m.control_type[0] == "negative"
    assert m.perturbation_type.tolist() == ["control", "control", "compound", "compound"] * 2
    assert m.concentration[2] == 10000.0
    src = ["DNA", "ER", "AGP", "RNA", "Mito"]
    for plate in ["BR00117010", "BR00117011"]:
        for c, ch in enumerate(src):
            px = np.concatenate([raw[(plate, w, s, ch)].ravel() for w in ["A01", "P24"] for s in (1, 2)])
            lo, hi = np.percentile(px, [0.1, 99.9])  # each image has < 16,384 pixels: all are sampled
            for i in np.flatnonzero(m.plate == plate):
                r = m.iloc[i]
                x = raw[(plate, f"{chr(64 + r.well_row)}{r.well_col:02d}", r.site, ch)].astype(np.float64)
                want = np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
                np.testing.assert_array_equal(st.read(i)[..., c], want)


def test_jump_8bit_unchanged_and_csv_perturbations(tmp_path):
    csv, raw = write_jump(tmp_path / "jump", np.uint8)
    df = pd.read_csv(csv)
    df["Metadata_JCP2022"] = np.where(df.Metadata_Well == "A01", "DMSO", "JCP2022_012345")
    df.to_csv(csv, index=False)
    st = ImageStore.open(import_jump(csv, tmp_path / "store", perturbation_type="gene"))
    r = st.metadata.iloc[3]
    np.testing.assert_array_equal(st.read(3)[..., 2], raw[(r.plate, "P24", r.site, "AGP")])
    assert st.metadata.perturbation_type.tolist()[:4] == ["control", "control", "gene", "gene"]


def test_channel_registry():
    assert canonical_order("jump", ["DNA", "ER", "RNA", "AGP", "Mito"]) == [
        ("DNA", "DNA"),
        ("ER", "ER"),
        ("AGP", "Actin"),
        ("RNA", "RNA"),
        ("Mito", "Mito"),
    ]
    assert canonical_name("rxrx", "6") == "Golgi" and canonical_name("jump", "Hoechst") == "DNA"
    x = np.arange(2 * 5).reshape(2, 5)
    y = conform(x, ["DNA", "ER", "Actin", "RNA", "Mito"], CANONICAL, fill_missing=True)
    assert y.tolist() == [[0, 1, 2, 3, 4, 0], [5, 6, 7, 8, 9, 0]]
    assert conform(x, ["DNA", "ER", "Actin", "RNA", "Mito"], ["Mito", "DNA"]).tolist() == [[4, 0], [9, 5]]
    with pytest.raises(DataError, match="missing \\['Golgi'\\]"):
        conform(x, ["DNA", "ER", "Actin", "RNA", "Mito"])
    with pytest.raises(DataError, match="'w9' of source 'rxrx' is not in the channel registry"):
        canonical_name("rxrx", "w9")
    with pytest.raises(DataError, match="both map to Actin"):
        canonical_order("jump", ["AGP", "phalloidin"])
    assert parse_well("P24") == (16, 24) and parse_well("AF48") == (32, 48)


# ---------------------------------------------------------------------------------------------- bad input
def _rx(tmp_path):
    return write_rxrx1(tmp_path / "rx", sites=(1,))


@pytest.mark.parametrize(
    "case, match",
    [
        (
            "missing_file",
            r"HEPG2-01/Plate1/C03_s1_w4.png: image file not found \(image HEPG2-01_1_C03_s1, channel RNA\)",
        ),
        ("corrupt", r"B02_s1_w2.png: cannot decode image \(image U2OS-02_2_B02_s1, channel ER\)"),
        (
            "rgb",
            r"C03_s1_w1.png: image of shape \(24, 20, 3\) \(image HEPG2-01_1_C03_s1, channel DNA\), expected one "
            r"channel per file",
        ),
        ("size", r"AB10_s1_w5.png: size \(12, 20\) differs from channel DNA \(24, 20\) \(image U2OS-02_2_AB10_s1\)"),
        ("missing_column", r"metadata.csv: missing required column\(s\) plate"),
        ("duplicate", r"duplicate image_id 'HEPG2-01_1_B02_s1' \(row 4\)"),
        ("bad_well", r"well 'B0X': expected a plate address like B03"),
    ],
)
def test_rxrx_bad_input(tmp_path, case, match):
    csv, _ = _rx(tmp_path)
    base = tmp_path / "rx" / "train"
    if case == "missing_file":
        (base / "HEPG2-01/Plate1/C03_s1_w4.png").unlink()
    elif case == "corrupt":
        (base / "U2OS-02/Plate2/B02_s1_w2.png").write_bytes(b"\x89PNG garbage")
    elif case == "rgb":
        (base / "HEPG2-01/Plate1/C03_s1_w1.png").write_bytes(imagecodecs.png_encode(np.zeros((H, W, 3), np.uint8)))
    elif case == "size":
        (base / "U2OS-02/Plate2/AB10_s1_w5.png").write_bytes(imagecodecs.png_encode(np.zeros((12, W), np.uint8)))
    elif case == "missing_column":
        pd.read_csv(csv).drop(columns="plate").to_csv(csv, index=False)
    elif case == "duplicate":
        df = pd.read_csv(csv)
        pd.concat([df, df.iloc[:1]]).to_csv(csv, index=False)
    elif case == "bad_well":
        df = pd.read_csv(csv)
        df.loc[1, "well"] = "B0X"
        df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=match) as err:
        import_rxrx(csv, tmp_path / "rx", tmp_path / "store")
    assert "\n" not in str(err.value)
    assert _only(tmp_path, "rx")  # no store, no temporary folder


@pytest.mark.parametrize(
    "case, match",
    [
        (
            "float_tiff",
            r"p01-ch2sk1fk1fl1_P24.tiff: dtype float32 \(image BR00117011_P24_s2, channel ER\), expected uint8 "
            r"or uint16",
        ),
        ("mixed_depth", r"p01-ch1sk1fk1fl1_A01.tiff: uint8 image in a uint16 import \(image BR00117011_A01_s1\)"),
        ("missing_channel_column", r"load_data.csv: missing required column\(s\) FileName_OrigAGP"),
        ("no_perturbation", r"perturbations: no perturbation for plate BR00117011 well P24"),
    ],
)
def test_jump_bad_input(tmp_path, case, match):
    csv, _ = write_jump(tmp_path / "jump")
    d = tmp_path / "jump" / "images" / "BR00117011"
    kw = {}
    if case == "float_tiff":
        tifffile.imwrite(d / "r01c01f02p01-ch2sk1fk1fl1_P24.tiff", np.zeros((H, W), np.float32))
    elif case == "mixed_depth":
        tifffile.imwrite(d / "r01c01f01p01-ch1sk1fk1fl1_A01.tiff", np.zeros((H, W), np.uint8))
    elif case == "missing_channel_column":
        pd.read_csv(csv).drop(columns="FileName_OrigAGP").to_csv(csv, index=False)
    elif case == "no_perturbation":
        kw["perturbations"] = pd.DataFrame(
            {
                "Metadata_Plate": ["BR00117010", "BR00117010", "BR00117011"],
                "Metadata_Well": ["A01", "P24", "A01"],
                "perturbation": ["a", "b", "c"],
            }
        )
    with pytest.raises(DataError, match=match) as err:
        import_jump(csv, tmp_path / "store", **kw)
    assert "\n" not in str(err.value)
    assert _only(tmp_path, "jump")


def _make_store_main(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_store", repo_root / "tools" / "make_store.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_make_store_cli(tmp_path, repo_root, capsys):
    from vitally_jax.cli import run_cli

    main = _make_store_main(repo_root)
    csv, imgs = write_rxrx1(tmp_path / "rx", sites=(1,))
    assert (
        run_cli(
            lambda: main(
                ["rxrx", str(csv), str(tmp_path / "rx"), str(tmp_path / "s"), "--montage", str(tmp_path / "m.png")]
            ),
            debug=False,
        )
        == 0
    )
    assert "4 images of 24x20x6" in capsys.readouterr().out and (tmp_path / "m.png").is_file()
    assert (
        run_cli(
            lambda: main(
                [
                    "synthetic",
                    str(tmp_path / "syn"),
                    "--set",
                    "n_genes=8",
                    "n_compounds=1",
                    "image_size=32",
                    "cell_radius=4.0",
                ]
            ),
            debug=False,
        )
        == 0
    )
    assert len(ImageStore.open(tmp_path / "syn")) > 20
    (tmp_path / "rx" / "train" / "U2OS-02" / "Plate2" / "B02_s1_w3.png").unlink()
    assert run_cli(lambda: main(["rxrx", str(csv), str(tmp_path / "rx"), str(tmp_path / "s2")]), debug=False) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "B02_s1_w3.png: image file not found" in err[0]
    assert not (tmp_path / "s2").exists()
    assert run_cli(lambda: main(["synthetic", str(tmp_path / "x"), "--set", "plate_format=100"]), debug=False) == 3
