"""Datasets, single-positive sampling, geometry-recording transforms and packed targets."""
from .geometry import GeometryRecordingTransform, PackedTargetDataset
from .label_names import COCO_LABEL_NAMES, VOC_LABEL_NAMES
from .targets import NUM_PACKED_FIELDS, PackedTarget, pack_target, unpack_target
