"""Column contracts of the tables that pass between stages (parquet files)."""

# ingest -> data/manifest.parquet: one row per image file, plus one per label row whose image is missing.
MANIFEST_COLUMNS = (
    "image_id",   # stem of the file name (e.g. SmearField_00012), or the id a label row names
    "path",       # relative to raw_dir (npz rows: "<file>.npz::<split>/<index>", see hemaflow.imageio); None
                  # for a label row whose image does not exist
    "sha256",     # content hash of the file bytes (npz rows: of the image array bytes); None if the file is missing
    "phash",      # 64-bit perceptual hash (imagehash.phash of the grayscale), 16 hex chars; None if not decodable
    "width", "height", "channels",  # decoded size; None if the file cannot be decoded
    "source",     # reader that produced the row (voc_fields, class_folders, ...)
    "label_raw",  # label text exactly as the source gives it; None if there is no label row
    "label_raw_2",  # a second annotator's label text (labels CSV with a second label column); else None
    "boxes",      # JSON list of [xmin, ymin, xmax, ymax] white-cell boxes; "[]" if none
    "split",      # split fixed by the source (MedMNIST keys, BCCD ImageSets lists), else None
    "error",      # why the file cannot be used (unreadable, truncated, ...); None if fine
)

# validate_labels -> data/labels/clean.parquet: manifest rows that passed + canonical label.
CLEAN_COLUMNS = MANIFEST_COLUMNS + ("label", "group_id")  # group_id: near-duplicate group (image_id of its first member)

# every review list (CSV a person works through): what, where, why.
REVIEW_COLUMNS = ("stage", "item", "path", "reason", "detail")

# paths.label_corrections (a person's decisions, applied by validate_labels; hemaflow/label_corrections.py)
CORRECTION_COLUMNS = ("path", "action", "label", "note")  # action: relabel | drop | keep | blank (undecided)

# segment -> data/crops/crops.parquet
CROP_COLUMNS = (
    "crop_id", "path",                 # path relative to crops_dir
    "source_id", "source_sha256", "source_path",
    "label", "x0", "y0", "x1", "y1",   # box in the source image
    "mask_area",                       # pixels of the cell mask in the source image
)

# split -> data/split.parquet: CROP_COLUMNS + split in {train, val, test}
# augment -> data/augmented/dataset.parquet
DATASET_COLUMNS = ("path", "label", "split", "source_id", "source_sha256", "crop_id", "augmented")
