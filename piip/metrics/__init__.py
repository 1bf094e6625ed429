"""What torchmetrics lacks: COCO results JSON + COCOeval, segmentation IoU/accuracy in the ADE20K sense."""
