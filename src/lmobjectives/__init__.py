"""lmobjectives: pre-training objectives for language models."""
