"""Measuring models: reconstruction and sample metrics (:mod:`.metrics`: PSNR, SSIM, codebook use, class
accuracy with the shipped classifiers) and FID / precision / recall with the pytorch-fid Inception
(:mod:`.fid`)."""

from bitdance.evaluation.fid import (
                                     FIDResult,
                                     InceptionFeatures,
                                     InceptionWeightsError,
                                     compute_fid,
                                     feature_statistics,
                                     frechet_distance,
                                     precision_recall,
)
from bitdance.evaluation.metrics import (
                                     class_accuracy,
                                     classify,
                                     codebook_usage,
                                     evaluate_reconstruction,
                                     load_classifier,
                                     psnr,
                                     ssim,
)

__all__ = ["FIDResult", "InceptionFeatures", "InceptionWeightsError", "class_accuracy", "classify",
           "codebook_usage", "compute_fid", "evaluate_reconstruction", "feature_statistics", "frechet_distance",
           "load_classifier", "precision_recall", "psnr", "ssim"]
