"""VQA (the paper's Figure 3a): the image-grounded encoder reads the question, an answer decoder writes the answer.

The question is encoded with ``[ENC]`` first and cross-attention to the image; the answer decoder (``[DEC]``
first, causal) cross-attends to the question's hidden states instead of the image. Both start from the
pre-trained model: the question encoder from its image-grounded encoder, the answer decoder from its decoder
(``from_blip``). VQA is generation, not classification: fine-tuning is the LM loss of the ground-truth answers,
weighted by each answer's share of the annotators; inference either generates an answer (beam search) or ranks
a candidate list as BLIP does (the top ``k`` candidates by the first token's probability are re-scored by their
whole log-likelihood).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import BlipConfig
from .generation import beam_search
from .losses import lm_loss
from .med import MED
from .model import BlipBase, BlipModel, init_bert
from .registry import register_model
from .tokenizer import BlipTokenizer


@register_model
class BlipVQA(BlipBase):
    task = "vqa"

    def __init__(self, config: BlipConfig, tokenizer: BlipTokenizer | None = None):
        super().__init__(config, tokenizer)
        # Each is one stack (sharing="all" makes its two stacks one), so neither carries unused layers.
        self.question_encoder = MED(config.text, vision_width=config.vision.width, sharing="all")
        self.answer_decoder = MED(config.text, vision_width=config.text.width, sharing="all")
        self.max_answer_length = 10  # tokens, [DEC] and [SEP] included (BLIP's max_length=10)
        for module in (self.question_encoder, self.answer_decoder):
            module.apply(lambda m: init_bert(m, std=config.text.initializer_range))

    @classmethod
    def from_blip(cls, model: BlipModel) -> BlipVQA:
        """A VQA model starting from a pre-trained (or retrieval/captioning) model, as BLIP fine-tunes VQA. When the
        text and vision widths differ (ViT-L), the answer decoder's cross-attention keys/values are new."""
        vqa = cls(model.config, model.tokenizer)
        vqa.vision.load_state_dict(model.vision.state_dict())
        vqa.question_encoder.load_state_dict(model.text.stack_state("encoder"))
        state = model.text.stack_state("decoder")
        own = vqa.answer_decoder.state_dict()
        vqa.answer_decoder.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)
        return vqa.take_settings(model)

    # --- the two halves -------------------------------------------------------------------------
    def encode_question(self, images: torch.Tensor, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Question hidden states grounded in the image [B, T, text width] and the question's 1/0 mask [B, T]."""
        if len(questions) != len(images):
            raise ValueError(f"one question per image: {len(images)} images, {len(questions)} questions")
        ids, mask = self.tokenize(questions)
        ids[:, 0] = self.config.text.enc_token_id
        image_embeds = self.encode_image(images)
        with self.autocast():
            return self.question_encoder.encode(ids, mask, image_embeds=image_embeds), mask

    def _answer_ids(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(answers, max_length=self.max_answer_length)
        ids[:, 0] = self.config.text.bos_token_id
        return ids, mask

    def answer_log_likelihood(
        self,
        states: torch.Tensor,
        states_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Summed token log-likelihood of each answer [B * k] given its question's states ([B, T], k answers per
        question, consecutive). With label smoothing this is minus the training loss."""
        with self.autocast():
            logits = self.answer_decoder.decode(answer_ids, answer_mask, states, image_mask=states_mask).float()
        return -lm_loss(
            logits, answer_ids, self.config.text.pad_token_id, label_smoothing=label_smoothing, per_sequence=True
        )

    # --- fine-tuning ----------------------------------------------------------------------------
    def loss(
        self,
        images: torch.Tensor,
        questions: Sequence[str],
        answers: Sequence[Sequence[str]],
        weights: Sequence[Sequence[float]] | None = None,
    ) -> torch.Tensor:
        """BLIP's VQA loss: each question's answers (several per question in VQA v2, weighted by how many
        annotators gave them; equal weights when None) scored by the answer decoder's LM loss with label
        smoothing, summed with the weights and averaged over questions."""
        if len(answers) != len(questions):
            raise ValueError(f"one answer list per question: {len(questions)} questions, {len(answers)} answer lists")
        if any(len(a) == 0 for a in answers):
            raise ValueError("every question needs at least one answer")
        if weights is None:
            weights = [[1.0 / len(a)] * len(a) for a in answers]
        if [len(w) for w in weights] != [len(a) for a in answers]:
            raise ValueError("weights must give one weight per answer of each question")
        states, smask = self.encode_question(images, questions)
        counts = torch.tensor([len(a) for a in answers], device=self.device)
        flat = [a for group in answers for a in group]
        ids, mask = self._answer_ids(flat)
        w = torch.tensor([x for group in weights for x in group], dtype=torch.float32, device=self.device)
        nll = -self.answer_log_likelihood(
            states.repeat_interleave(counts, 0),
            smask.repeat_interleave(counts, 0),
            ids,
            mask,
            label_smoothing=self.config.label_smoothing,
        )
        return (w * nll).sum() / len(questions)

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self,
        images: torch.Tensor,
        questions: Sequence[str],
        *,
        answer_list: Sequence[str] | None = None,
        k: int = 128,
        num_beams: int = 3,
    ) -> list[str]:
        """One answer per question: generated by beam search (``answer_list`` None), or the best of
        ``answer_list`` by BLIP's ranking (top ``k`` candidates by first-token probability, then whole-answer
        log-likelihood)."""
        states, smask = self.encode_question(images, questions)
        if answer_list is None:
            prompt = torch.tensor([[self.config.text.bos_token_id]], device=self.device)
            with self.autocast():
                out = beam_search(
                    self.answer_decoder,
                    states,
                    prompt,
                    num_beams=num_beams,
                    max_length=self.max_answer_length,
                    min_length=1,
                    eos_token_id=self.config.text.sep_token_id,
                    pad_token_id=self.config.text.pad_token_id,
                    context_mask=smask,
                    beam_rule=self.config.beam_rule,  # the official VQA code answers with transformers 4.15's rule
                )
            return [t.strip() for t in self.tokenizer.decode_batch(out[:, 1:].tolist())]
        return [answer_list[i] for i in self.rank_answers(states, smask, answer_list, k).tolist()]

    def rank_answers(
        self, states: torch.Tensor, smask: torch.Tensor, answer_list: Sequence[str], k: int
    ) -> torch.Tensor:
        """Index into ``answer_list`` of each question's best candidate [B]."""
        if len(answer_list) == 0:
            raise ValueError("answer_list is empty")
        ids, mask = self._answer_ids(list(answer_list))
        B, k = states.shape[0], min(k, len(answer_list))
        start = torch.full((B, 1), self.config.text.bos_token_id, device=self.device)
        with self.autocast():
            first = self.answer_decoder.decode(start, None, states, image_mask=smask)[:, 0].float()
        first_prob = first.softmax(-1).index_select(1, ids[:, 1])  # [B, candidates]
        top_idx = first_prob.topk(k, dim=1).indices  # [B, k]
        flat = top_idx.reshape(-1)
        ll = self.answer_log_likelihood(states, smask, ids[flat], mask[flat]).view(B, k)
        return top_idx.gather(1, ll.argmax(1, keepdim=True)).squeeze(1)
