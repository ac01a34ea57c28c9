"""Everything capcli keeps on disk for later: atomic files and JSONL logs (:mod:`.files`),
checkpoints (:mod:`.checkpoint`), model folders (:mod:`.folder`) with their model card
(:mod:`.card`), and the Hugging Face Hub (:mod:`.hub`)."""
