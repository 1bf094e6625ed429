"""Official PIIP checkpoints -> piip names: the backbone (`official`), mmdet's Mask R-CNN heads
(`mmdet_rcnn`), mmseg's UperNet heads (`mmseg_upernet`) and PIIP-LLaVA's projector and language model
(`llava`). Pure torch: the run layer (`piip.run.convert`) reads files, builds the model and writes the piip
checkpoint."""
