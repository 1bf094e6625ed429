#!/usr/bin/env bash
# The GPU figures of issue 6, on one GPU (H100/H200), in one go: `bash benchmarks/gpu_checks.sh [OUT_DIR]`.
# Nothing downloads: the training steps use the embedded synthetic data resized to each model's detection
# resolution and random weights (load_pretrained=false), which is enough for speed and memory.
# Every command also runs on its own; each prints its figures and writes JSON or results.json under OUT.
set -euo pipefail
OUT=${1:-outputs/gpu_checks}
mkdir -p "$OUT"
BENCH="python -m piip.tools.benchmark task=coco device=cuda dtype=bf16"

# 1. backbone forward / forward+backward, PIIP against its single-branch baseline at detection resolution
$BENCH model=piip_tsb resolution=1568_896_448 baseline=vit_b output="$OUT/tsb_vs_vitb.json"
$BENCH model=piip_sbl resolution=1568_1120_672 baseline=vit_l output="$OUT/sbl_vs_vitl.json"
$BENCH model=piip_sbl resolution=1568_1120_672 baseline=vit_l compile=true output="$OUT/sbl_vs_vitl_compiled.json"

# 2. attention kernels: SDPA (default) against flash-attn (pip install '.[flash]')
if python -c "import flash_attn" 2>/dev/null; then
  $BENCH model=piip_sbl resolution=1568_1120_672 +model.attention_backend=flash output="$OUT/sbl_flash.json"
fi

# 3. bf16 training steps with activation checkpointing: images/s and MFU land in the run's logs
STEPS="task=shapes_det load_pretrained=false grad_checkpointing=true logger=csv trainer.max_steps=30
  trainer.limit_val_batches=0 test_after_fit=false task.data.synthetic.train_images=64 paths.output_dir=$OUT"
# shellcheck disable=SC2086
python train.py model=piip_sbl resolution=1568_1120_672 trainer=gpu $STEPS
# PIIP-H6B under FSDP on one GPU (no sharding possible with one rank): if the 6.9B model with AdamW states
# does not fit, halve both branches (the interactions split the blocks evenly) and report the depth used.
# shellcheck disable=SC2086
python train.py model=piip_h6b resolution=1024_512 trainer=fsdp trainer.devices=1 $STEPS ||
  python train.py model=piip_h6b resolution=1024_512 trainer=fsdp trainer.devices=1 $STEPS \
    +model.branch0.timm_kwargs.depth=16 model.branch1.timm_kwargs.depth=24
# 4. DINO with the paper's detector (900 queries, 6 + 6 layers, 100 denoising queries) on PIIP-SBL-384 at
# 1792 px: bf16 steps on the shapes data resized to 1792^2; images/s and peak memory land in the run's logs
DINO="task.module.detector.num_queries=900 task.module.detector.num_encoder_layers=6
  task.module.detector.num_decoder_layers=6 task.module.detector.dim=256 task.module.detector.ffn_dim=2048
  task.module.detector.num_dn=100 task.module.detector.size_divisible=224 task.data.scale=[1792,1792]"
# shellcheck disable=SC2086
python train.py model=piip_sbl_384 resolution=1792_1120_672 trainer=gpu ${STEPS/shapes_det/shapes_det_dino} $DINO
python benchmarks/dino_encoder_memory.py --size 1792
# 5. deformable sampling: torch (grid-sample) against the Triton kernel, op level (DINO encoder layer at 1792,
# a PIIP-SBL interaction at 1568) and whole backbone, with peak memory; then the kernel's GPU tests
for case in dino_1792 piip_interaction; do
  for dtype in fp32 bf16; do python benchmarks/deformable_backends.py --case $case --dtype $dtype; done
done
$BENCH model=piip_sbl resolution=1568_1120_672 +model.deformable_backend=torch output="$OUT/sbl_deform_torch.json"
$BENCH model=piip_sbl resolution=1568_1120_672 +model.deformable_backend=triton output="$OUT/sbl_deform_triton.json"
python -m pytest -q -m gpu tests/test_deformable_triton.py
nvidia-smi --query-gpu=name,memory.total --format=csv
