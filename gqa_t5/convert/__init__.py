"""MHA -> GQA/MQA checkpoint conversion (`gqa-t5 convert`): pooling methods and the streaming
converter. Import `gqa_t5.convert.converter` or `gqa_t5.convert.cli`; nothing loads here."""
