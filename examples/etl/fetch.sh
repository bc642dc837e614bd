#!/bin/sh
# Pretend to download a data set: a CSV of (day, item, amount) rows.
set -eu
kind="$1"
bonus=0
[ "$kind" = stock ] && bonus=11
echo "fetching $kind (attempt $WFD_ATTEMPT of step $WFD_STEP_ID)"
sleep 0.5
{
  echo "day,item,amount"
  for day in 1 2 3 4 5; do
    for item in apples pears plums; do
      echo "$day,$item,$(( (day * 7 + ${#item} * 3 + bonus) % 23 + 1 ))"
    done
  done
} > "$OUT/$kind.csv"
echo "wrote $OUT/$kind.csv ($(wc -l < "$OUT/$kind.csv") lines)"
