"""Training, export and checks of the lungsentry U-Net (README.md).

Each script runs from the repository root either way:

    python -m models.train.train --config models/train/runs/v9.toml
    python models/train/train.py --config models/train/runs/v9.toml

Modules import each other as `models.train.<module>`; a script run as a file first puts the repository root on
the import path. `normalise.py` and `model.py` import nothing from the package, so the Rust preprocessing test and
scripts/bench_torch.py still load them with models/train on the path.
"""
