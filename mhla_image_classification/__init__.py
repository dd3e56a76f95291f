"""MHLA image classification (to come): timm-registered DeiT-style ViTs with softmax, linear and MHLA
attention, and compact train/eval scripts on timm's data, mixup, optimiser, scheduler and EMA APIs,
with one YAML config per row of the paper's ImageNet table."""
