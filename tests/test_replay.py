"""ReplayBuffer against a naive reference that stores every obs and next_obs in full.

Pixel frames are synthetic (3, 4, 4) uint8 images that carry their own global frame number n: every pixel of
channels 0 and 2 is n % 256 and every pixel of channel 1 is n // 256, so a rebuilt stack can be decoded back into
frame numbers, and a frame overwritten in the ring shows up as a wrong number. Each transition's action carries the
transition's global number, so a sampled row can be matched with the reference transition it claims to be.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sacae.replay import Batch, ReplayBuffer

FRAME_SHAPE = (3, 4, 4)
ACTION_DIM = 2


def make_frame(n: int) -> np.ndarray:
    f = np.full(FRAME_SHAPE, n % 256, dtype=np.uint8)
    f[1] = (n // 256) % 256
    return f


def decode(stack: np.ndarray | torch.Tensor) -> list[int]:
    """Frame numbers of a stacked observation (k * 3, 4, 4), oldest first; -1 for a frame that is not a frame."""
    stack = np.asarray(stack)
    numbers = []
    for i in range(stack.shape[0] // 3):
        f = stack[3 * i : 3 * i + 3]
        ok = (f[0] == f[0, 0, 0]).all() and (f[1] == f[1, 0, 0]).all() and (f[2] == f[0]).all()
        numbers.append(int(f[0, 0, 0]) + 256 * int(f[1, 0, 0]) if ok else -1)
    return numbers


@dataclass
class Transition:
    obs: np.ndarray
    action: np.ndarray
    reward: float
    next_obs: np.ndarray
    not_done: float


class Feeder:
    """Plays episodes into a ReplayBuffer the way the trainer does, keeping a naive full-observation reference."""

    def __init__(self, buf: ReplayBuffer, frame_stack: int, new_frame=None):
        self.buf = buf
        self.k = frame_stack
        self.next_frame_no = 0
        self.ref: list[Transition] = []
        self.new_frame = new_frame or self._numbered_frame
        self.frames_of_transition: list[list[int]] = []  # frame numbers f_0..f_N of the transition's episode

    def _numbered_frame(self) -> np.ndarray:
        f = make_frame(self.next_frame_no)
        self.next_frame_no += 1
        return f

    def _stack(self, frames: list[np.ndarray]) -> np.ndarray:
        if self.k == 1:
            return frames[-1].copy()
        n = len(frames)
        return np.concatenate([frames[max(0, n - self.k + i)] for i in range(self.k)], axis=0)

    def episode(self, length: int, terminated: bool = False, after_each=None) -> None:
        frames = [self.new_frame()]
        obs = self._stack(frames)
        self.buf.start_episode(obs)
        if after_each is not None:
            after_each()
        for t in range(length):
            frames.append(self.new_frame())
            next_obs = self._stack(frames)
            g = len(self.ref)
            action = np.array([g, -0.5 * g], dtype=np.float32)
            reward = 0.25 * g + 0.125
            not_done = 0.0 if (terminated and t == length - 1) else 1.0
            self.buf.add(action, reward, next_obs, not_done)
            self.ref.append(Transition(obs, action, reward, next_obs, not_done))
            obs = next_obs
            if after_each is not None:
                after_each()

    def live(self) -> list[int]:
        """Global numbers of the transitions the buffer should hold: the newest `capacity`."""
        total = len(self.ref)
        return list(range(max(0, total - self.buf.capacity), total))

    def slot(self, g: int) -> int:
        return g % self.buf.capacity


def assert_rows_match(batch: Batch, rows: list[int], ref: list[Transition]) -> None:
    """Row i of the batch is reference transition rows[i], every field equal."""
    assert len(rows) == batch.obs.shape[0]
    expected = [ref[g] for g in rows]
    np.testing.assert_array_equal(batch.obs.numpy(), np.stack([t.obs for t in expected]), err_msg=f"obs {rows}")
    np.testing.assert_array_equal(
        batch.next_obs.numpy(), np.stack([t.next_obs for t in expected]), err_msg=f"next_obs {rows}"
    )
    np.testing.assert_array_equal(batch.action.numpy(), np.stack([t.action for t in expected]))
    np.testing.assert_array_equal(batch.reward.numpy()[:, 0], np.array([t.reward for t in expected], np.float32))
    np.testing.assert_array_equal(batch.not_done.numpy()[:, 0], np.array([t.not_done for t in expected], np.float32))


def assert_all_live_match(feeder: Feeder) -> None:
    buf = feeder.buf
    live = feeder.live()
    assert len(buf) == len(live)
    if not live:
        return
    batch = buf.gather(np.array([feeder.slot(g) for g in live]))
    assert_rows_match(batch, live, feeder.ref)


# ------------------------------------------------------------------------------------------------------------
# Stacks rebuilt from indices equal the naive reference


@pytest.mark.parametrize("frame_stack", [1, 2, 3, 4])
def test_gather_matches_reference_across_episodes_of_different_lengths(frame_stack):
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=100, frame_stack=frame_stack, episode_length=10)
    feeder = Feeder(buf, frame_stack)
    for length in [1, 2, 3, 10, 5, 7, 4]:
        feeder.episode(length, terminated=length < 10)
    assert len(buf) == 32
    assert not buf.full
    assert_all_live_match(feeder)


def test_episode_boundaries_decode_as_reset_frame_repeated():
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=50, frame_stack=3, episode_length=6)
    feeder = Feeder(buf, 3)
    feeder.episode(6)  # frames 0..6
    feeder.episode(4)  # frames 7..11
    batch = buf.gather(np.arange(10))
    obs = [decode(o) for o in batch.obs]
    nxt = [decode(o) for o in batch.next_obs]
    # First episode: f0 fills the stack.
    assert obs[0] == [0, 0, 0] and nxt[0] == [0, 0, 1]
    assert obs[1] == [0, 0, 1] and nxt[1] == [0, 1, 2]
    assert obs[2] == [0, 1, 2] and nxt[2] == [1, 2, 3]
    assert obs[5] == [3, 4, 5] and nxt[5] == [4, 5, 6]
    # Second episode: its own reset frame (7) fills the stack, never frames of the episode before.
    assert obs[6] == [7, 7, 7] and nxt[6] == [7, 7, 8]
    assert obs[7] == [7, 7, 8] and nxt[7] == [7, 8, 9]
    assert obs[8] == [7, 8, 9] and nxt[8] == [8, 9, 10]
    assert obs[9] == [8, 9, 10] and nxt[9] == [9, 10, 11]
    assert batch.obs.shape == (10, 9, 4, 4) and batch.obs.dtype == torch.uint8
    assert batch.next_obs.shape == (10, 9, 4, 4) and batch.next_obs.dtype == torch.uint8


@pytest.mark.parametrize(
    "episode_length,capacity,n_transitions,frame_stack",
    [
        (5, 12, 47, 3),
        (1, 7, 30, 3),
        (3, 10, 64, 4),
        (7, 20, 203, 2),
        (4, 9, 50, 1),
        (10, 10, 35, 3),
        (25, 8, 90, 3),  # capacity smaller than one episode
    ],
)
def test_transition_ring_wraps_keeping_newest_and_decoding_all(episode_length, capacity, n_transitions, frame_stack):
    """Fixed-length episodes as the buffer was sized for: every live transition decodes, at every moment."""
    buf = ReplayBuffer(
        FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=capacity, frame_stack=frame_stack, episode_length=episode_length
    )
    feeder = Feeder(buf, frame_stack)

    def check():
        assert_all_live_match(feeder)

    left = n_transitions
    while left > 0:
        length = min(episode_length, left)  # the last episode may be cut short by the end of the test only
        feeder.episode(length, after_each=check)
        left -= length
    assert buf.full
    assert len(buf) == capacity
    # A new episode started but with no transition yet (its reset frame is written): still all decode.
    feeder.episode(0, after_each=check)
    # The buffer holds exactly the newest `capacity` transitions.
    batch = buf.gather(np.arange(capacity))
    held = sorted(int(a) for a in batch.action[:, 0])
    assert held == list(range(n_transitions - capacity, n_transitions))


def test_frame_ring_wrap_with_early_terminations_never_samples_overwritten_frames():
    """Episodes far shorter than episode_length need more frames than the ring has: sampling must skip the
    transitions whose frames are gone, and everything it returns must decode to the right frames."""
    capacity = 40
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=capacity, frame_stack=3, episode_length=50, seed=3)
    feeder = Feeder(buf, 3)
    rng = np.random.default_rng(0)
    saw_overwritten = False
    for ep in range(120):
        feeder.episode(int(rng.integers(1, 5)), terminated=True)
        if ep < 10 or ep % 5:
            continue
        live = feeder.live()
        # Not vacuous: some live transitions really did lose frames (gather does not redraw).
        full = buf.gather(np.array([feeder.slot(g) for g in live]))
        intact = {
            g
            for i, g in enumerate(live)
            if np.array_equal(full.obs[i].numpy(), feeder.ref[g].obs)
            and np.array_equal(full.next_obs[i].numpy(), feeder.ref[g].next_obs)
        }
        saw_overwritten = saw_overwritten or len(intact) < len(live)
        sampled = set()
        for _ in range(4):
            batch = buf.sample(64)
            rows = [int(a) for a in batch.action[:, 0]]
            assert set(rows) <= set(live)
            assert_rows_match(batch, rows, feeder.ref)
            sampled.update(rows)
            # The decoded stacks are consistent: next_obs is obs shifted by one new frame.
            for o, n in zip(batch.obs, batch.next_obs, strict=True):
                do, dn = decode(o), decode(n)
                assert -1 not in do and -1 not in dn
                assert dn[:2] == do[1:] and dn[2] == do[2] + 1
        assert sampled <= intact
        assert len(sampled) >= len(intact) // 2  # it still draws across the intact ones
    assert saw_overwritten


# ------------------------------------------------------------------------------------------------------------
# State vectors


def test_state_mode_float_vectors_frame_stack_1():
    dim = 5
    rng = np.random.default_rng(1)
    buf = ReplayBuffer((dim,), np.float32, ACTION_DIM, capacity=9, frame_stack=1, episode_length=4)
    feeder = Feeder(buf, 1, new_frame=lambda: rng.standard_normal(dim).astype(np.float32))
    for length in [4, 4, 1, 3, 4, 4]:
        feeder.episode(length, terminated=length < 4, after_each=lambda: assert_all_live_match(feeder))
    assert buf.full
    batch = buf.sample(16)
    assert batch.obs.shape == (16, dim) and batch.obs.dtype == torch.float32
    assert batch.next_obs.shape == (16, dim) and batch.next_obs.dtype == torch.float32
    rows = [int(a) for a in batch.action[:, 0]]
    assert_rows_match(batch, rows, feeder.ref)
    # The first transition of an episode starts from that episode's reset vector, not the previous next_obs.
    firsts = [g for g in feeder.live() if g > 0 and feeder.ref[g - 1].not_done == 0.0]
    assert firsts
    for g in firsts:
        assert not np.array_equal(feeder.ref[g].obs, feeder.ref[g - 1].next_obs)


def test_state_mode_accepts_torch_dtype():
    buf = ReplayBuffer((3,), torch.float32, 1, capacity=4)
    buf.start_episode(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    buf.add(np.array([0.5], dtype=np.float32), 1.5, np.array([4.0, 5.0, 6.0], dtype=np.float32), 1.0)
    b = buf.gather(np.array([0]))
    np.testing.assert_array_equal(b.obs[0].numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(b.next_obs[0].numpy(), [4.0, 5.0, 6.0])


# ------------------------------------------------------------------------------------------------------------
# Actions, rewards, not_done


def test_actions_rewards_not_done_round_trip():
    rng = np.random.default_rng(2)
    action_dim = 6
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, action_dim, capacity=30, frame_stack=3, episode_length=10)
    stored = []
    n = 0
    for length in [10, 3, 10]:
        buf.start_episode(np.concatenate([make_frame(n)] * 3))
        n += 1
        for t in range(length):
            a = rng.uniform(-1, 1, size=action_dim).astype(np.float32)
            r = float(rng.normal())
            d = 0.0 if (length == 3 and t == length - 1) else 1.0
            buf.add(a, r, np.concatenate([make_frame(n)] * 3), d)
            n += 1
            stored.append((a, r, d))
    idx = np.arange(len(stored))
    batch = buf.gather(idx[::-1].copy())
    assert batch.action.shape == (len(stored), action_dim) and batch.action.dtype == torch.float32
    assert batch.reward.shape == (len(stored), 1) and batch.reward.dtype == torch.float32
    assert batch.not_done.shape == (len(stored), 1) and batch.not_done.dtype == torch.float32
    for row, i in enumerate(idx[::-1]):
        a, r, d = stored[i]
        np.testing.assert_array_equal(batch.action[row].numpy(), a)
        assert batch.reward[row, 0].item() == pytest.approx(r, rel=1e-6)  # stored as float32
        assert batch.not_done[row, 0].item() == d
    assert sorted(batch.not_done[:, 0].tolist()).count(0.0) == 1
    assert batch.obs.device.type == "cpu"


# ------------------------------------------------------------------------------------------------------------
# Sampling


def _filled(n_transitions: int, capacity: int, seed: int = 0, episode_length: int = 5) -> Feeder:
    buf = ReplayBuffer(
        FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=capacity, frame_stack=3, episode_length=episode_length, seed=seed
    )
    feeder = Feeder(buf, 3)
    left = n_transitions
    while left > 0:
        feeder.episode(min(episode_length, left))
        left -= episode_length
    return feeder


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_is_uniform_and_only_from_filled_part_before_full():
    feeder = _filled(20, capacity=50)
    buf = feeder.buf
    assert len(buf) == 20 and not buf.full
    counts = np.zeros(20)
    for _ in range(20):
        batch = buf.sample(4096)
        rows = batch.action[:, 0].numpy().astype(int)
        # Unfilled slots would decode as transition 0 with reward 0; filled ones carry reward 0.25 g + 0.125.
        assert (batch.reward[:, 0].numpy() > 0).all()
        assert rows.min() >= 0 and rows.max() < 20
        np.add.at(counts, rows, 1)
    assert (counts > 0).all()
    # 19 degrees of freedom: mean 19, sd ~6; 60 is far in the tail.
    assert _chi_square(counts) < 60
    idx = buf.sample_indices(10_000)
    assert idx.min() >= 0 and idx.max() < 20


def test_sampling_is_uniform_over_capacity_once_full():
    feeder = _filled(75, capacity=30)
    buf = feeder.buf
    assert buf.full
    counts = Counter()
    for _ in range(20):
        rows = buf.sample(4096).action[:, 0].numpy().astype(int)
        counts.update(rows.tolist())
    assert set(counts) == set(range(45, 75))  # every live transition, nothing overwritten
    assert _chi_square(np.array([counts[g] for g in range(45, 75)])) < 80  # 29 dof


def test_same_seed_same_samples_different_seed_different():
    a = _filled(40, capacity=64, seed=7).buf
    b = _filled(40, capacity=64, seed=7).buf
    c = _filled(40, capacity=64, seed=8).buf
    ia, ib, ic = a.sample_indices(256), b.sample_indices(256), c.sample_indices(256)
    np.testing.assert_array_equal(ia, ib)
    assert not np.array_equal(ia, ic)
    ba, bb = a.sample(32), b.sample(32)
    for x, y in zip(ba, bb, strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("episode_length,action_dim", [(125, 1), (250, 6)])  # cartpole x8, cheetah x4
def test_bytes_per_transition_of_a_million_pixel_transitions(episode_length, action_dim):
    capacity = 1_000_000
    frame_bytes = 3 * 84 * 84
    total = ReplayBuffer.estimate_bytes((3, 84, 84), 1, action_dim, capacity, 3, episode_length)
    per_transition = total / capacity
    assert per_transition < 21.4e3
    naive = 2 * 3 * frame_bytes  # obs and next_obs, 9x84x84 each
    assert naive == 127_008
    assert per_transition < naive / 5
    # It cannot be below one frame per transition plus the action, reward and not_done it must keep.
    assert per_transition > frame_bytes + 4 * action_dim + 8


@pytest.mark.parametrize(
    "frame_shape,dtype,itemsize,action_dim,capacity,frame_stack,episode_length",
    [
        ((3, 84, 84), np.uint8, 1, 6, 1000, 3, 250),
        ((3, 84, 84), np.uint8, 1, 1, 1000, 3, 125),
        ((3, 16, 16), np.uint8, 1, 2, 333, 4, 7),
        ((17,), np.float32, 4, 6, 1000, 1, 1000),
    ],
)
def test_estimate_bytes_equals_allocated_buffer(
    frame_shape, dtype, itemsize, action_dim, capacity, frame_stack, episode_length
):
    buf = ReplayBuffer(frame_shape, dtype, action_dim, capacity, frame_stack=frame_stack, episode_length=episode_length)
    estimate = ReplayBuffer.estimate_bytes(frame_shape, itemsize, action_dim, capacity, frame_stack, episode_length)
    assert estimate == buf.nbytes
    assert buf.bytes_per_transition == pytest.approx(buf.nbytes / capacity)
    # nbytes accounts for every array the buffer really allocated.
    held = 0
    for value in vars(buf).values():
        if isinstance(value, torch.Tensor):
            held += value.untyped_storage().nbytes()
        elif isinstance(value, np.ndarray):
            held += value.nbytes
    assert held == buf.nbytes


# ------------------------------------------------------------------------------------------------------------
# Misuse


def test_add_before_start_episode_raises():
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=10, frame_stack=3)
    obs = np.concatenate([make_frame(1)] * 3)
    with pytest.raises(RuntimeError, match="start_episode"):
        buf.add(np.zeros(ACTION_DIM, np.float32), 0.0, obs, 1.0)
    assert len(buf) == 0


def test_sampling_an_empty_buffer_raises():
    buf = ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=10, frame_stack=3)
    with pytest.raises(RuntimeError):
        buf.sample(4)
    with pytest.raises(RuntimeError):
        buf.sample_indices(4)
    buf.start_episode(np.concatenate([make_frame(0)] * 3))  # a reset frame alone is no transition
    assert len(buf) == 0
    with pytest.raises(RuntimeError):
        buf.sample(4)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        ReplayBuffer(FRAME_SHAPE, np.uint8, ACTION_DIM, capacity=0)
