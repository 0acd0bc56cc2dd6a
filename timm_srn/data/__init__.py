"""Datasets, flip rules for labels, single-positive sampling, geometry-recording transforms and packed targets."""
from .flips import INVARIANT, BoxRelationFlip, ClassSwapFlip, LabelFlip, flip_boxes, require_label_flip
from .geometry import GeometryRecordingTransform, PackedTargetDataset, horizontal_flip_prob
from .label_names import COCO_LABEL_NAMES, VOC_LABEL_NAMES
from .targets import NUM_PACKED_FIELDS, PackedTarget, pack_target, unpack_target
from .datasets import (
    CocoDataset, CsvDataset, MultiLabelDataset, NpyDataset, RealDataset, VocDataset, csv_label_names, find_unreadable)
from .single_positive import (
    SinglePositive, load_observed_labels, protocol_split, sample_single_positive, save_observed_labels,
    split_train_val)
from .synthetic import SYNTHETIC_LABEL_NAMES, generate_synthetic_coco, relation_holds, synthetic_label_flip
from .factory import DATASET_NAMES, create_dataset
