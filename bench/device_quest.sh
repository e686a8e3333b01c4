#!/usr/bin/env bash
# Sessions 26–28 on the GPU machine (NOTES §41–43, results/2026-11-27-h200-quest/ and
# results/2026-11-27-h200-spread/): what a Quest layer costs at batch 1, the sanitizers, and
# Quest's top-k spread over the GPU. Model pieces, the stash of binaries and the 120k index go
# through `bench/device_layers.sh` (stash DIR | piece | index | setup | calib128).
# Usage: bash bench/device_quest.sh STEP [ARGS]
#   tests | tests2 | b1 BUDGET [BINARIES] | ncu BUDGET | b8 BUDGET | steps | qtop BUDGET |
#   calib32 | hybrid32 | report | take DIR | low BUDGETS | shared | tests3 | tests4 | ncuq |
#   win128 | win128b | win32 | share128 | passkeys BUDGET SHARE (the last two: 3d9e0fd's
#   binaries; --window-share was removed after them) | qwin128 | fused | qplan128 | qpass128 BUDGET |
#   qplan32 | b1q | sweep32 | calib32w | low128 | questall128 | win32q | tests5 | fill32 | fill128 |
#   routing32 | mean32 | mean128 | meanpass128 BUDGET | tests7 | part32 | part128 | partpass128 BUDGET |
#   fix32 | inc32 | inc128 | sanitize8 | tests10 | routing32f | fine32 | fine32q | pass32f | sanitize10 | routing32g | routing128f | fine128 |
#   tests11 | shares32 | pass32s | shares128 | pass128s BUDGET SCORES
# `take DIR` (session 27): a carried folder's binaries (DIR/bin, unpacked into /tmp/bin and kept
# for `setup`), texts (DIR/texts), model pieces (DIR/q) and indexes (DIR/idx), so that every call
# can carry one prepared folder.
# `throughput_old` and `bench_report_old` are the previous commit's (session 26: 9438f4e;
# session 27: faf992b, its bench_report with this commit's `quest` section).
set -uo pipefail
step=$1
source "$(dirname "$0")/device_common.sh"
X="$I/q128k-64k.safetensors"
# The layers calibration recorded for Quest in session 25 (NOTES §39): the index in .idx/ was
# calibrated before sparse routings were recorded, so they are named here.
CALIBRATED=0,1,2,4,5,6,7,8,9,10,12,13,14,15,17,18,19,20,23
ALL=$(seq -s, 0 23)
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
unpack_tests() {
  mkdir -p "$bin" && cp .devT/bin/*.gz "$bin/" && gunzip -f "$bin"/*.gz && chmod +x "$bin"/*
  for f in "$bin"/*-????????????????; do [ -e "$f" ] && mv "$f" "${f%-*}"; done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
}
case $step in
tests)
  # Session 25 moved the query's RoPE to the side stream: memcheck on the captured and eager
  # steps, racecheck on Quest's top-k (shared with the classifier's top-ℓ).
  unpack_tests
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run timeout 240 "$sanitizer" --tool memcheck "$bin/graph" --test-threads 1
  run timeout 180 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 decode_matches_cpu quest
  run timeout 120 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 quest ;;
tests2)
  # Quest's top-k in page order (the histogram of ranks from the score kernel): parity, graphs,
  # both sanitizers on the top-k kernels (the routing tests run the classifier's and Quest's).
  unpack_tests
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run timeout 200 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 quest_route route_matches_cpu
  run timeout 200 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 quest_route_ties route_matches_cpu ;;
b1)
  # Batch 1 at 120k, budget $2: the plan alone, the calibrated hybrid, Quest in every layer, for
  # each binary of $3 (default: this session's `throughput`).
  for b in ${3:-throughput}; do
    tb() { run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 1 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget "$1" "${@:2}"; }
    tb "$2"
    tb "$2" --quest-layers "$CALIBRATED"
    tb "$2" --quest-layers "$ALL"
  done ;;
b8)
  # Batch 8 at 120k, budget $2, 8 × 255 tokens: the calibrated hybrid, old binary then new.
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget "$2" --quest-layers "$CALIBRATED"
  done ;;
qtop)
  # One launch of Quest's top-k in a decode step (past the warm-up's), every section and the
  # SASS with its warp samples, Quest in every layer at budget $2.
  run ncu --clock-control none --set full -k regex:saap_quest_top --launch-skip 40 --launch-count 1 \
    -o /tmp/qtop -f "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 \
    --batch 1 --tokens 3 --chunk 32768 --all-sparse --plan-floor 0.25 --graph off \
    --keys-budget "$2" --quest-layers "$ALL" > /dev/null
  ncu --import /tmp/qtop.ncu-rep --page details > "$OUT/qtop_details.txt"
  ncu --import /tmp/qtop.ncu-rep --page source --csv --print-source sass > "$OUT/qtop_sass.csv" ;;
calib32)
  # NOTES §42: session 24's 32k recipe (NOTES §32), now also recording sparse routings.
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --out "$I/q32k.safetensors"
  sha256sum "$I/q32k.safetensors" | tee -a "$OUT/calib32.txt" ;;
routing32)
  # NOTES §52: per layer at 32k, Saap's indexed mass against partition pages and Quest at its keys.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --seqs 1 --skip ppl,nih --out "$OUT/routing32" ;;
mean32)
  # NOTES §53: Quest's pages by bound and by mean at 32k and 10%: the index's hybrid, then Quest in
  # every layer; batch 8, 8 × 1023 tokens.
  for layers in "--hybrid" "--quest-layers $ALL"; do
    run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --page-score bound,mean $layers
  done ;;
mean128)
  # NOTES §53: the same at 120k, 3% and 4%.
  for layers in "--hybrid" "--quest-layers $ALL"; do
    run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03,0.04 --page-score bound,mean $layers
  done ;;
meanpass128)
  # NOTES §53: passkeys at 120k, 5 depths, with Quest's pages by mean: the hybrid (Saap's column)
  # and Quest in every layer (Quest's column) at budget $2.
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse --hybrid --keys-budget "$2" --plan-floor 0.25 --quest-budget "$2" --page-score mean --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-mean-$2" ;;
tests7)
  # Session 33 (NOTES §55): parity (Quest pages over partitions on both backends) and graphs.
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
part32)
  # NOTES §55: Quest in every layer at 32k and 10%, pages by mean, consecutive then over the
  # partitions; then the hybrid likewise; batch 8, 8 × 1023 tokens.
  for layers in "--quest-layers $ALL" "--hybrid"; do
    run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --page-score mean --page-layout consecutive,partitions $layers
  done ;;
part128)
  # NOTES §55: the same at 120k, 3% and 4%, Quest in every layer.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03,0.04 --page-score mean --page-layout consecutive,partitions --quest-layers "$ALL" ;;
partpass128)
  # NOTES §55: passkeys at 120k, 5 depths, Quest in every layer over partition pages by mean
  # (Quest's column) at budget $2.
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse --keys-budget "$2" --plan-floor 0.25 --quest-budget "$2" --page-score mean --page-layout partitions --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-part-$2" ;;
fix32)
  # NOTES §55, after the fix of P = 0 pages: passkeys at 32k, 5 depths in one call (each depth a
  # new prefill), the hybrid over partition pages by mean at 11%; then its perplexity again.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --hybrid --keys-budget 0.11 --plan-floor 0.25 --quest-budget 0.11 --page-score mean --page-layout partitions --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey32-part-0.11"
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.11 --index "$I/q32k.safetensors" --page-score mean --page-layout partitions --hybrid ;;
tests10)
  # Session 34 (NOTES §61): parity and graphs with partition pages of 4 keys beside 16.
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
routing32f)
  # NOTES §58–61: per layer at 32k, partition pages of 16, 8 and 4 keys (the perfect router and
  # the mean route), by mean and spread, with the classifier's prior.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --seqs 1 --skip ppl,nih --out "$OUT/routing32f" ;;
fine32)
  # NOTES §61: 32k, batch 8, 8 × 1023 tokens, partition pages of 16, 8 and 4 keys by mean: the
  # hybrid at 11%.
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.11 --index "$I/q32k.safetensors" --page-score mean --page-layout partitions:16,partitions:8,partitions:4 --hybrid ;;
fine32q)
  # NOTES §61: the same with Quest in every layer at 10%.
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --page-score mean --page-layout partitions:16,partitions:8,partitions:4 --quest-layers "$ALL" ;;
pass32f)
  # NOTES §61: passkeys at 32k, 5 depths, the hybrid over partition pages of 4 keys by mean at 11%.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --hybrid --keys-budget 0.11 --plan-floor 0.25 --quest-budget 0.11 --page-score mean --page-layout partitions:4 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey32-part4-0.11" ;;
sanitize10)
  # Session 34: memcheck on the Quest parity test (partition pages of 16 and 4 keys).
  run timeout 300 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 quest_matches_cpu ;;
routing32g)
  # NOTES §63: routing32f with the group caps and the group-share route.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --seqs 1 --skip ppl,nih --out "$OUT/routing32g" ;;
routing128f)
  # NOTES §61: routing32f at 120k (YaRN ×4).
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --seqs 1 --skip ppl,nih --out "$OUT/routing128f" ;;
fine128)
  # NOTES §61: 120k, 3%, Quest in every layer, partition pages of 16 and 8 keys by mean (pages of
  # 4 exceed MAX_QUEST_PAGES there).
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03 --page-score mean --page-layout partitions:16,partitions:8 --quest-layers "$ALL" ;;
tests11)
  # Session 35 (NOTES §66): parity (Quest by shares, its top-k on the selection kernels up to
  # MAX_QUEST_PAGES) and graphs; memcheck and racecheck on the shares' parity test.
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run timeout 200 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 quest_shares_route quest_matches_cpu
  run timeout 150 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 quest_shares_route ;;
shares32)
  # NOTES §66: 32k, batch 8, 8 × 1023 tokens, Quest in every layer at 10% over partition pages of
  # 16 and 4 keys, by mean and by the group's shares; then the hybrid at 11% over pages of 4.
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --page-score mean,shares --page-layout partitions:16,partitions:4 --quest-layers "$ALL"
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.11 --index "$I/q32k.safetensors" --page-score mean,shares --page-layout partitions:4 --hybrid ;;
pass32s)
  # NOTES §66: passkeys at 32k, 5 depths, Quest in every layer over partition pages of 4 keys by
  # the group's shares at 10%.
  run "$bin/evaluate" --model "$M" --cuda --index "$I/q32k.safetensors" --all-sparse --quest-layers "$ALL" --keys-budget 0.10 --plan-floor 0.25 --quest-budget 0.10 --page-score shares --page-layout partitions:4 --skip routing,ppl --nih-lengths 32000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey32-shares4-0.10" ;;
shares128)
  # NOTES §66: 120k (YaRN ×4), batch 8, 8 × 1023 tokens, Quest in every layer at 3% and 4% over
  # partition pages of 8 keys, by mean and by the group's shares.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03,0.04 --page-score mean,shares --page-layout partitions:8 --quest-layers "$ALL" ;;
pass128s)
  # NOTES §66: passkeys at 120k, 5 depths, Quest in every layer over partition pages of 8 keys at
  # budget $2, pages by each score of $3 (mean, shares).
  for score in ${3//,/ }; do
    run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse --quest-layers "$ALL" --keys-budget "$2" --plan-floor 0.25 --quest-budget "$2" --page-score "$score" --page-layout partitions:8 --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-$score-8-$2"
  done ;;
sanitize8)
  # Session 33: memcheck on the Quest parity test (partition pages: the decode's directory path
  # with one list per KV group, candle's gathers) and on the graph replays; racecheck on the Quest
  # parity test.
  run timeout 250 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 quest_matches_cpu
  run timeout 200 "$sanitizer" --tool memcheck "$bin/graph" --test-threads 1 replayed_steps_match_step_by_step
  run timeout 120 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 quest_matches_cpu ;;
inc32)
  # NOTES §56: ce3fded's binary (`throughput_old`, every page recomputed at a merge) then f7d15a6's
  # (only the changed ones): 32k, 10%, Quest in every layer, consecutive then partition pages by
  # mean, batch 8, 8 × 1023 tokens.
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --page-score mean --page-layout consecutive,partitions --quest-layers "$ALL"
  done ;;
inc128)
  # NOTES §56: the same at 120k (YaRN ×4), 3%.
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03 --page-score mean --page-layout consecutive,partitions --quest-layers "$ALL"
  done ;;
hybrid32)
  # 32k, every layer sparse at 10%: the plan alone and the hybrid, batch 8 (8 × 1023 tokens) and 1.
  for h in "" --hybrid; do
    run "$bin/throughput" --model "$M" --cuda --index "$I/q32k.safetensors" --context 32000 --batch 8,1 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 $h
  done ;;
steps)
  # The classifier's top-ℓ (histograms per warp) and the Llama-3.1-8B layer step, 9438f4e's
  # kernels (`bench_report_old`) against this commit's, alternated twice.
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=route,steps run "$bin/$b" 131072,171008 1,8
  done ;;
take)
  mkdir -p /tmp/stash/bin /tmp/stash/texts /tmp/q "$bin"
  [ -d "$2/bin" ] && cp "$2"/bin/*.gz /tmp/stash/bin/ && for f in "$2"/bin/*.gz; do
    n=$(basename "${f%.gz}"); gunzip -c "$f" > "$bin/${n%-????????????????}"; chmod +x "$bin/${n%-????????????????}"
  done
  [ -d "$2/texts" ] && cp "$2"/texts/* /tmp/stash/texts/
  [ -d "$2/q" ] && cp "$2"/q/* /tmp/q/
  [ -d "$2/idx" ] && mkdir -p "$I" && cp "$2"/idx/* "$I"/ && sha256sum "$I"/*
  ls "$bin" /tmp/q /tmp/stash/texts | tr '\n' ' ' ;;
low)
  # Session 27 (NOTES §44): the calibrated hybrid at budgets $2 (a comma list), batch 8 (8 × 1023
  # tokens), then batch 1 (256 tokens).
  for b in "8 1024" "1 256"; do
    read -r batch tokens <<< "$b"
    run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch "$batch" --tokens "$tokens" --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget "$2" --hybrid
  done ;;
tests3)
  # Session 27 (tests3_*, tests4_*, tests5_* in results/2026-11-27-h200-spread/): parity, graphs,
  # memcheck on the Quest and decode parity tests and a replayed graph, racecheck on Quest's ties.
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1
  run timeout 200 "$sanitizer" --tool memcheck "$bin/cuda_parity" --test-threads 1 quest decode_matches_cpu route_matches_cpu
  run timeout 200 "$sanitizer" --tool memcheck "$bin/graph" --test-threads 1 replayed_steps_match_step_by_step
  run timeout 200 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 quest_route_ties route_matches_cpu ;;
tests4)
  # Session 28 (NOTES §46): tests3, then racecheck on the decode parity test (Quest's pages read
  # from an ascending list: one shared reduction of the pages' sizes per block).
  step=tests3 bash "$0" tests3
  run timeout 300 "$sanitizer" --tool racecheck "$bin/cuda_parity" --test-threads 1 decode_matches_cpu ;;
ncuq)
  # Session 27 (ncu_quest_*): kernel durations of `bench_report`'s Quest section (Llama heads,
  # 131k × 1), the previous commit's binary then this one's.
  for b in bench_report_old bench_report; do
    echo "== $b" >> "$OUT/ncu_quest.txt"
    SAAP_REPORT_ONLY=quest ncu --clock-control none --metrics gpu__time_duration.sum -k regex:saap_quest \
      --launch-skip 30 --launch-count 12 "$bin/$b" 131072 1 2>&1 | grep -E "saap_quest|duration" |
      paste - - | awk '{print $1, $(NF)}' >> "$OUT/ncu_quest.txt"
  done ;;
shared)
  # Session 27 (NOTES §45): one Quest page list per KV group; `throughput_old` is 60aceb8's.
  # Batch 1 (hybrid at 5% and 6%, Quest everywhere at 6%), old then new; batch 8 (the hybrid at
  # 6%, 8 × 255 tokens), old then new; then the new kernels' durations (ncu, hybrid at 6%).
  for b in throughput_old throughput; do
    tb() { run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on "$@"; }
    tb --batch 1 --keys-budget 0.05,0.06 --hybrid
    tb --batch 1 --keys-budget 0.06 --quest-layers "$ALL"
  done
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.06 --hybrid
  done
  step=ncu bash "$0" ncu 0.06 ;;
report)
  # Session 27 (NOTES §43): Quest's routing alone, the classifier's, and the Llama-3.1-8B layer
  # step, faf992b's kernels (`bench_report_old`) against this commit's, alternated twice; the
  # layer step once more with the classifier's hidden width of the shipped indexes (64); FA2 in
  # the same call.
  for b in bench_report_old bench_report bench_report_old bench_report; do
    SAAP_REPORT_ONLY=quest,route,steps run "$bin/$b" 131072,171008 1,8
  done
  SAAP_REPORT_HIDDEN=64 SAAP_REPORT_ONLY=route,steps run "$bin/bench_report" 171008 1,8
  run python3 bench/fa2_prefill_anchor.py 171008 1,8 decode ;;
ncu)
  # Kernel durations (ncu serializes kernels) of 4 eager tokens per mode, the calibrated hybrid
  # at budget $2, each decode kernel labelled by the routing launched before it.
  run ncu --clock-control none --metrics gpu__time_duration.sum \
    -k 'regex:saap_quest|saap_route|saap_decode|saap_rope_write' --log-file "$OUT/ncu.log" \
    -o /tmp/ncu_hybrid -f "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" \
    --context 120000 --batch 1 --tokens 4 --chunk 32768 --all-sparse --plan-floor 0.25 \
    --graph off --keys-budget "$2" --quest-layers "$CALIBRATED" > /dev/null
  ncu --import /tmp/ncu_hybrid.ncu-rep --csv --page raw > "$OUT/ncu_hybrid.csv"
  python3 bench/ncu_layers.py "$OUT/ncu_hybrid.csv" | tee "$OUT/ncu.txt" ;;
win128)
  # Session 29 (NOTES §47): the calibrated hybrid at 4% and 5%, windows 2048 (the index's), 1024
  # and 512 on the same prefilled caches; batch 8 then batch 1, 1023 tokens per item.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8,1 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04,0.05 --hybrid --window 2048,1024,512 ;;
win128b)
  # NOTES §47, after win128: windows larger than the index's (the prefill keeps the largest),
  # the hybrid at 4%, 5% and 6%, batch 8, 8 × 1023 tokens.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04,0.05,0.06 --hybrid --window 4096,3072,2048 ;;
win32)
  # NOTES §47: 32k, the index of `calib32` (window 2048), the plan alone at 10% and 13%, batch 8
  # (8 × 1023 tokens), windows 3072, 2048 and 1024 on the same caches.
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10,0.13 --index "$I/q32k.safetensors" --window 3072,2048,1024 ;;
share128)
  # NOTES §47: the window at half the budget (--window-share 0.5) against the index's 2048, the
  # hybrid at 4–8%, batch 8 (8 × 1023 tokens), then batch 1 (256 tokens) at 5%.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04,0.045,0.05,0.06,0.08 --hybrid --window 2048 --window-share 0.5
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 1 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.05 --hybrid --window 2048 --window-share 0.5 ;;
passkeys)
  # NOTES §47: 120k, 5 depths, the hybrid at budget $2, the window at share $3 of it (every mode).
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse --hybrid --keys-budget "$2" --plan-floor 0.25 --quest-budget "$2" --window-share "$3" --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-share$3-$2" ;;
qwin128)
  # NOTES §47: the Quest layers' window alone widened (the classifier layers keep 2048), the
  # hybrid at 4%, 5% and 6%, batch 8 (8 × 1023 tokens).
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04,0.05,0.06 --hybrid --window 2048 --quest-window 2048,3072,4096 ;;
fused)
  # NOTES §48: the fused classifier MLP (`throughput`) against cf619ee's kernels
  # (`throughput_old`), alternated: 32k, the plan alone at 10% (the index of `calib32`), then
  # 120k, the hybrid at 6%; batch 1 and 8, 256 tokens per item.
  for b in throughput_old throughput throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --context 32000 --batch 1,8 --tokens 256 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors"
  done
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 1,8 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.06 --hybrid
  done ;;
qplan128)
  # Session 30 (NOTES §49): the index recalibrated with Quest curves (`device_layers.sh calib128`),
  # the hybrid at 4% and 5% with its Quest layers in the plan and out of it (the earlier
  # behaviour) on the same caches; batch 8, 8 × 1023 tokens.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04,0.05 --hybrid --compare-quest-plan ;;
qpass128)
  # NOTES §49: passkeys at 120k, 5 depths, the hybrid (Quest layers planned) at budget $2.
  run "$bin/evaluate" --model "$M" --cuda --yarn 4 --index "$X" --all-sparse --hybrid --keys-budget "$2" --plan-floor 0.25 --quest-budget "$2" --skip routing,ppl --nih-lengths 120000 --nih-depths 0.1,0.25,0.5,0.75,0.9 --out "$OUT/passkey128-qplan-$2" ;;
qplan32)
  # NOTES §49: 32k (the index of `calib32`, recalibrated with Quest curves) at 10%: the plan
  # alone, then the hybrid with its Quest layers in the plan and out of it; batch 8, 8 × 1023.
  for h in "" "--hybrid --compare-quest-plan"; do
    run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" $h
  done ;;
b1q)
  # NOTES §49: batch 1 at 120k, 256 tokens, the hybrid at 3% and 4%, Quest layers in the plan
  # and out of it.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 1 --tokens 256 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03,0.04 --hybrid --compare-quest-plan ;;
sweep32)
  # NOTES §49: 32k, budgets 10–11% at windows 2048 and 1024, the plan alone then the hybrid.
  for h in "" --hybrid; do
    run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10,0.105,0.11 --index "$I/q32k.safetensors" --window 2048,1024 $h
  done ;;
calib32w)
  # NOTES §49: `calib32` with a 1024-token window, then the plan alone and the hybrid at 10% and
  # 10.5% with it (`w1024idx.txt`).
  run "$bin/calibrate" --model "$M" --cuda --context 32768 --seqs 2 --queries 512 --epochs 30 --hidden 64 --window 1024 --out "$I/q32k-w1024.safetensors"
  sha256sum "$I/q32k-w1024.safetensors" | tee -a "$OUT/calib32w.txt"
  for h in "" --hybrid; do
    step=w1024idx run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10,0.105 --index "$I/q32k-w1024.safetensors" $h
  done ;;
low128)
  # NOTES §49: the hybrid at 3.5%, Quest layers in the plan and out of it; batch 8, 8 × 1023.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.035 --hybrid --compare-quest-plan ;;
questall128)
  # NOTES §49: Quest in every layer at 4%, planned from the Quest curves and not; batch 8.
  run "$bin/throughput" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.04 --quest-layers "$ALL" --compare-quest-plan ;;
win32q)
  # NOTES §49, second round: 32k at 10%, the planned hybrid with the Quest layers' window below
  # the classifier layers' (2048 or 1024 beside 2048, 1024, 512), then the plan alone at windows
  # 1536 and 1024 with floors 0, ¼ and ½; batch 8, 8 × 1023 tokens.
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --hybrid --window 2048,1024 --quest-window 2048,1024,512
  run "$bin/throughput" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0,0.25,0.5 --keys-budget 0.10 --index "$I/q32k.safetensors" --window 1536,1024 ;;
fill32)
  # Session 31 (NOTES §50): the plan's fractional columns (`throughput`: 885dcbc's first change,
  # then the second) against 128db88's whole-ℓ columns (`throughput_old`) on the same index: 32k
  # at 10%, the plan alone at windows 1536 and 1024, then the planned hybrid at 2048; batch 8,
  # 8 × 1023 tokens.
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --window 1536,1024
    run "$bin/$b" --model "$M" --cuda --context 32000 --batch 8 --tokens 1024 --all-sparse --graph on --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" --hybrid
  done ;;
fill128)
  # NOTES §50: 120k, the hybrid at 3% and 4%, old columns against new; batch 8, 8 × 1023.
  for b in throughput_old throughput; do
    run "$bin/$b" --model "$M" --cuda --yarn 4 --index "$X" --context 120000 --batch 8 --tokens 1024 --chunk 32768 --all-sparse --plan-floor 0.25 --graph on --keys-budget 0.03,0.04 --hybrid
  done ;;
tests5)
  # Session 30: parity and graphs with the Quest layers' pages scaled by a plan (host code).
  run "$bin/cuda_parity" --test-threads 1
  run "$bin/graph" --test-threads 1 ;;
ncuf)
  # NOTES §48: routing kernels' durations (ncu), 4 eager tokens at 32k, batch 1, plan at 10%,
  # old binary then new.
  for b in throughput_old throughput; do
    echo "== $b" >> "$OUT/ncuf.txt"
    ncu --clock-control none --metrics gpu__time_duration.sum -k regex:saap_route --launch-skip 48 --launch-count 24 \
      "$bin/$b" --model "$M" --cuda --context 32000 --batch 1 --tokens 4 --all-sparse --graph off --plan-floor 0.25 --keys-budget 0.10 --index "$I/q32k.safetensors" 2>&1 |
      grep -E "saap_route|duration" | paste - - | awk '{print $1, $(NF)}' >> "$OUT/ncuf.txt"
  done
  cat "$OUT/ncuf.txt" ;;
esac
