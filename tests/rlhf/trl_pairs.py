"""TRL's view of megaswift's preference micro-batches: the same pairs as token lists."""



def trl_examples(batch: dict) -> list[dict]:
    """TRL's prompt_ids / chosen_ids / rejected_ids of each pair of a micro-batch: a sequence's rendered tokens
    are its input tokens plus its last label; the completion is the trained span (weights > 0)."""
    tokens, labels, mask, ids = (batch[k].reshape(-1) for k in ("tokens", "labels", "loss_mask", "sequence_ids"))
    examples = []
    for k in range(int(batch["num_pairs"])):
        sides = {}
        for side, sid in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
            where = (ids == sid).nonzero().flatten()
            rendered = tokens[where].tolist() + [int(labels[where[-1]])]
            trained = (mask[where] > 0).nonzero().flatten() + 1  # positions in `rendered`
            start, end = int(trained[0]), int(trained[-1]) + 1
            assert trained.numel() == end - start, "a completion is one contiguous trained span"
            sides[side] = rendered[:start], rendered[start:end]
        assert sides["chosen"][0] == sides["rejected"][0], "chosen and rejected share the prompt"
        examples.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                         "rejected_ids": sides["rejected"][1]})
    return examples
