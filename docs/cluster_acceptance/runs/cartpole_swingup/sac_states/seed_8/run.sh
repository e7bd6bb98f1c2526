#!/usr/bin/env bash
# Training run cartpole_swingup/sac_states/seed_8, written by `sacae sweep`. Running it again resumes the run.
cd /work/evidence/accept
exec /work/main/.venv/bin/sacae train --task cartpole_swingup --encoder_type pixel --decoder_type pixel --num_train_steps 1000000 --init_steps 1000 --batch_size 128 --eval_freq 10000 --num_eval_episodes 10 --save_tb --save_video --encoder_type identity --decoder_type identity --num_train_steps 2000 --init_steps 500 --eval_freq 1000 --num_eval_episodes 2 --seed 8 --work_dir /work/evidence/accept/runs/cartpole_swingup/sac_states/seed_8
