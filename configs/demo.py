"""The embedded default: pixels -> curated training set -> small MAE -> every block -> b* -> maps -> report.

    python -m vitally_jax.main --config=configs/demo.py                      # 2 CPU cores, <= 15 min
    python -m vitally_jax.main --config=configs/demo.py --workdir=runs/mine  # another output folder
    python -m vitally_jax.main --config=configs/demo.py:ci                   # shrunken end-to-end run (CI)

No downloads: the synthetic Cell Painting screen is generated into WORKDIR/screen. Outputs: WORKDIR/report.html
(self-contained), WORKDIR/results.json, WORKDIR/results.csv. Rerunning reuses finished stages
(WORKDIR/stages/*.json); `--config.force=pretrain,embed` reruns named stages and everything after them.

The report's "Findings" table checks the paper's claims on the run's own numbers: the trained MAE should beat a
random-init ViT of the same size on known-relationship recall (CORUM, StringDB) and on probe accuracy, and
TVN-aligned maps should beat unaligned ones on recall. The probe stage picks the pooling used for every encoder's
maps (`probe.pooling` lists the candidates; the trained model's probe decides).

Measured with this config (mu/8 encoder: width 64, 3 blocks, patch 8 on 64x64 crops of near-confluent 128x128
fields; 2,600 AdamW steps of 64 crops, loss 1.25 -> 0.79; 11.8 min wall on 2 cores, 9.7 of them pretraining):
the MAE's probe prefers mean pooling; at b* with TVN maps the trained MAE beats the random-init ViT on CORUM
recall (0.194 vs 0.126), StringDB (0.190 vs 0.113), the gene-group probe (0.47 vs 0.23) and the perturbation probe
(0.018 vs 0.011, both near chance: 2-3 wells per class), and TVN beats unaligned (0.147 vs 0.135). Both encoders
stay far below the image-statistics baseline (gene groups 0.77): self-standardised crops remove this world's
per-channel intensity phenotypes, which the baseline reads directly. The encoder comparison depends on the
readout: the MAE's probe chose mean pooling by a hair (0.245 vs 0.239 for CLS + norm), and with CLS pooling the
random-init ViT reaches 0.61-0.62 on the gene-group probe, above the MAE at any pooling (best 0.475); the report's
pooling-sensitivity table shows this for every run. With the paper's Lion, or 320 steps of a wider model, the MAE
never leaves the predict-the-mean plateau (loss ~1.0) and loses to random init at every pooling.
"""

import ml_collections

from vitally_jax import config_lib
from vitally_jax.errors import ConfigError


def get_config(arg=None):
    """`arg`: None (full demo) or "ci"/"smoke" (everything shrunk for a <= 3 min end-to-end run)."""
    arg = (arg or "").strip()
    if arg not in ("", "ci", "smoke"):
        raise ConfigError(f"configs/demo.py: unknown argument {arg!r}; expected nothing, 'ci' or 'smoke'")
    small = arg in ("ci", "smoke")

    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.workdir = "./runs/demo-ci" if small else "./runs/demo"  # used when --workdir is not given
    c.seed = 0
    c.force = ""  # comma-separated stage names to rerun even if finished (and everything after them)

    # The synthetic screen (vitally_jax.data.synthetic): a preset plus overrides of SyntheticConfig fields.
    c.screen = ml_collections.ConfigDict()
    c.screen.store = None  # an existing store folder to use instead of generating one
    c.screen.preset = "tiny" if small else "demo"
    c.screen.overrides = ml_collections.ConfigDict()  # field -> value, applied to the preset

    # Curation (vitally_jax.curation.CurationConfig fields) on image-statistics embeddings.
    c.curate = ml_collections.ConfigDict()
    c.curate.enabled = True
    c.curate.min_experiments = 2
    c.curate.min_wells = 2
    c.curate.keep_positive_controls = 0.1
    c.curate.keep_negative_controls = 0.3
    c.curate.n_permutations = 200 if small else 1000
    c.curate.alpha = 0.05
    c.curate.quality = True

    # Pretraining: a complete trainer config (config_lib.build), trained on WORKDIR/screen + the curated index.
    t = config_lib.build(
        dict(
            variant="mu/8",
            total_steps=2600,
            global_batch=64,
            peak_lr=1.5e-3,
            drop_path_rate=0.0,
            mesh=(-1, 1, 1),
            peak_flops=None,
        ),
        None,
    )
    t.model.in_chans = 6
    # encoder: mu/8 (width 64, 3 blocks, patch 8) with LayerScale starting at 0.1 (as CaiT does for shallow ViTs)
    # so that the blocks contribute early (1e-4 keeps them near identity for hundreds of steps)
    t.model.width = 64
    t.model.depth = 3
    t.model.num_heads = 2
    t.model.mlp_dim = 256
    t.model.init_values = 0.1
    t.model.decoder_depth = 1  # the decoder sees all 64 tokens: keep it light, spend the compute on the encoder
    t.model.decoder_width = 64
    t.model.decoder_heads = 2
    # AdamW, not the paper's Lion: at this size and step count Lion's fixed-size sign steps never leave the
    # predict-the-mean plateau (loss ~1.0 after 320 steps; on a sanity task the PyTorch reference MAE sits on the
    # same plateau), while AdamW leaves it after ~600 steps. Small steps, many of them: 2,600 x 64 crops.
    t.optax.name = "adamw"
    t.input.crop = 64
    t.input.in_memory = True  # the demo screen (~250 MB) fits in memory: crops become numpy slices
    t.checkpoint.every_steps = 500
    t.checkpoint.keep = 1
    t.checkpoint.export_encoder = True
    t.log.every_steps = 100
    t.log.recon_every_steps = 1000
    t.log.recon_images = 2
    t.log.tensorboard = False
    if small:
        t.model.decoder_width = 32
        t.input.crop = 32
        t.input.global_batch = 32
        t.total_steps = 30
        t.checkpoint.every_steps = 30
        t.log.every_steps = 10
        t.log.recon_every_steps = 30
    c.train = t

    # Embedding every block of each encoder (vitally_jax.embedding.screen); crops tile each image.
    c.embed = ml_collections.ConfigDict()
    c.embed.crop = t.input.crop
    c.embed.poolings = "cls,cls_norm,mean,mean_norm"  # stored poolings (one pass computes them all)
    c.embed.batch_size = 64 if small else 256
    c.embed.random_seed = 1  # seed of the random-init baseline encoder

    # Probe sweep (vitally_jax.probes.sweep).
    c.probe = ml_collections.ConfigDict()
    # the pooling probed and mapped: "cls" | "cls_norm" | "mean" | "mean_norm", or a list: each is probed and the
    # one with the trained model's best probe accuracy at b* is used for every encoder's maps
    c.probe.pooling = "mean" if small else "mean,cls_norm"
    c.probe.backend = "sklearn" if small else "jax"  # "jax" (all blocks in one vmapped solve) | "sklearn"
    c.probe.test_fraction = 0.25
    c.probe.folds = 3 if small else 5
    c.probe.group_min_size = 3 if small else 5  # functional gene groups: disjoint CORUM complexes of this many
    c.probe.group_max_size = 20  # ... to this many screened genes
    c.probe.b_star_task = "mean"  # which task's b* picks the block for maps: "mean" | "perturbation" | "gene_groups"

    # Maps and benchmarks (vitally_jax.benchmarks).
    c.bench = ml_collections.ConfigDict()
    c.bench.alignments = "unaligned,pca_centerscale,tvn"
    c.bench.batch_col = "experiment"  # the unit of batch effect that alignment corrects, per batch
    c.bench.pca_components = 0  # 0 = all components
    c.bench.sources = "CORUM,HuMAP,Reactome,SIGNOR,StringDB"
    c.bench.compound_seeds = 5 if small else 100
    c.bench.map_permutations = 100 if small else 1000
    return c
