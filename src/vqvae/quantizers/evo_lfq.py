"""EvoLFQ: an encoder, an LFQ bottleneck and a decoder, plus a genetic search over the bits.

The autoencoder trains as usual through ``forward``; ``evolve`` then searches the binary
latent space for bit strings whose decodings score well under a user's fitness function
(tournament selection, uniform crossover, bit-flip mutation, elitism). A drop-in for
``vector_quantize_pytorch.EvoLFQ``::

    evo = EvoLFQ(encoder, decoder, dim=8)
    for result in evo.evolve(fitness_fn, shape=(8,), generations=10):
        ...  # result.best_fitness, result.best_gene

Bits may be 0/1 or, with ``is_sign=True``, -1/+1; any value > 0 reads as a 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .lfq import LFQ
from .vector_quantize import QuantizerInputError


class Return(NamedTuple):
    reconstructed: Tensor
    indices: Tensor
    entropy_aux_loss: Tensor


class Result(NamedTuple):
    pop_bits: Tensor
    best_gene: Tensor | None
    best_fitness: float
    best_decoded: Tensor | None


@contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode for the block, then every submodule's own training flag back."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class EvoLFQ(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, lfq: LFQ | None = None, *,
                 dim: int | None = None, codebook_size: int | None = None,
                 num_codebooks: int = 1, pop_size: int = 64, mutation_rate: float = 0.02,
                 tournament_size: int = 2, elitism_count: int = 1, generations: int = 50,
                 **lfq_kwargs):
        super().__init__()
        if pop_size <= elitism_count:
            raise ValueError("pop_size must be greater than elitism_count")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("EvoLFQ needs an lfq instance or dim / codebook_size")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks,
                      **lfq_kwargs)
        self.encoder, self.decoder, self.lfq = encoder, decoder, lfq
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.zero.device

    def _quantize(self, latents: Tensor, **kwargs):
        flat = latents.ndim == 2  # (B, D) latents become a one-token sequence
        quantized, indices, loss = self.lfq(latents[:, None] if flat else latents, **kwargs)
        if flat:
            quantized, indices = quantized[:, 0], indices[:, 0]
        return quantized, indices, loss

    def forward(self, x: Tensor, **kwargs) -> Return:
        quantized, indices, loss = self._quantize(self.encoder(x), **kwargs)
        return Return(self.decoder(quantized), indices, loss)

    @torch.no_grad()
    def encode(self, x: Tensor, return_signs: bool = False) -> Tensor:
        """Bits (0/1, or -1/+1 with ``return_signs``) of the quantised latents of ``x``."""
        with _eval_mode(self):
            quantized, _, _ = self._quantize(self.encoder(x))
        positive = quantized > 0
        return positive.float() * 2 - 1 if return_signs else positive.float()

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Tensor:
        """Decoder output for bit strings (..., codebook_dim * num_codebooks)."""
        lfq = self.lfq
        k, c = lfq.codebook_dim, lfq.num_codebooks
        if bits.shape[-1] != k * c:
            raise QuantizerInputError(f"bits must end in {k * c} bits, got {tuple(bits.shape)}")
        with _eval_mode(self):
            lead = bits.shape[:-1]
            b = (bits > 0).long().reshape(-1, c, k)  # (M, C, k)
            weights = 2 ** torch.arange(k - 1, -1, -1, device=b.device)
            indices = (b * weights).sum(-1)  # (M, C)
            if not lfq.keep_num_codebooks_dim:
                indices = indices[:, 0]
            codes = lfq.indices_to_codes(indices[:, None])  # one-token sequences
            codes = codes.reshape(*lead, codes.shape[-1])
            return self.decoder(codes)

    # genetic operators

    def init_random_population(self, pop_size: int | None = None, shape=None, device=None,
                               is_sign: bool = False) -> Tensor:
        pop_size = self.pop_size if pop_size is None else pop_size
        device = self.device if device is None else device
        bits = torch.randint(0, 2, (pop_size, *shape), device=device).float()
        return bits * 2 - 1 if is_sign else bits

    def init_population_from_data(self, x: Tensor, pop_size: int | None = None,
                                  mutation_rate: float | None = None,
                                  is_sign: bool = False) -> Tensor:
        pop_size = self.pop_size if pop_size is None else pop_size
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        repeats = -(-pop_size // bits.shape[0])
        bits = bits.repeat(repeats, *([1] * (bits.ndim - 1)))[:pop_size]
        return self.mutate(bits, mutation_rate=rate, is_sign=is_sign) if rate > 0 else bits

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        return torch.where(torch.rand(parent1.shape, device=parent1.device) < 0.5,
                           parent1, parent2)

    def mutate(self, population: Tensor, mutation_rate: float | None = None,
               is_sign: bool = False) -> Tensor:
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand(population.shape, device=population.device) < rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(self, population: Tensor, fitnesses: Tensor,
                             tournament_size: int | None = None) -> Tensor:
        size = self.tournament_size if tournament_size is None else tournament_size
        n = population.shape[0]
        contenders = torch.randint(0, n, (n, size), device=population.device)
        winners = contenders.gather(1, fitnesses[contenders].argmax(-1, keepdim=True))[:, 0]
        return population[winners]

    @torch.no_grad()
    def step(self, pop_bits: Tensor, fitness_fn: Callable, tournament_size: int | None = None,
             mutation_rate: float | None = None, elitism_count: int | None = None,
             is_sign: bool = False, batch_size: int | None = None, **kwargs):
        """One generation: returns (next population, fitnesses of ``pop_bits``)."""
        size = self.tournament_size if tournament_size is None else tournament_size
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elites_n = self.elitism_count if elitism_count is None else elitism_count
        n = pop_bits.shape[0]
        if batch_size is not None:
            decoded = torch.cat([self.decode_bits(c) for c in pop_bits.split(batch_size)])
        else:
            decoded = self.decode_bits(pop_bits)
        fitnesses = fitness_fn(decoded, pop_bits)
        if not isinstance(fitnesses, Tensor):
            fitnesses = torch.tensor(fitnesses, device=pop_bits.device, dtype=torch.float32)
        if fitnesses.shape != (n,) or not torch.isfinite(fitnesses).all():
            raise QuantizerInputError(f"fitness_fn must return {n} finite scores, got "
                                      f"shape {tuple(fitnesses.shape)}")
        elites = pop_bits[fitnesses.argsort(descending=True)[:elites_n]].clone()
        children = n - elites_n
        contenders = torch.randint(0, n, (children, 2, size), device=pop_bits.device)
        parents = contenders.gather(-1, fitnesses[contenders].argmax(-1, keepdim=True))[..., 0]
        offspring = self.uniform_crossover(pop_bits[parents[:, 0]], pop_bits[parents[:, 1]])
        offspring = self.mutate(offspring, mutation_rate=rate, is_sign=is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn: Callable, pop_bits: Tensor | None = None,
               pop_size: int | None = None, shape=None, generations: int | None = None,
               is_sign: bool = False, return_best_decoded: bool = False,
               **step_kwargs) -> Iterator[Result]:
        """Yields a Result after each generation; the best gene is the best scored so far."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs pop_bits or shape")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        for _ in range(generations):
            scored = pop_bits
            pop_bits, fitnesses = self.step(scored, fitness_fn, is_sign=is_sign, **step_kwargs)
            i = int(fitnesses.argmax())
            if fitnesses[i].item() > best_fitness:
                # the gene that earned the score: the library takes row i of the *next*
                # population, which after selection is usually a different gene
                best_fitness, best_gene = fitnesses[i].item(), scored[i].clone()
            decoded = None
            if return_best_decoded:
                decoded = self.decode_bits(best_gene[None])[0]
            yield Result(pop_bits, best_gene, best_fitness, decoded)
