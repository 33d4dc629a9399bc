#!/bin/bash
# #15: --average with time targets on held-out demo videos (seed 9, never seen in training or calibration)
set -e
cd /tmp/m
AD=/work/main/.venv/bin/adafocus
[ -d /tmp/m/data9 ] || $AD demo-data /tmp/m/data9 --videos 600 --seed 9 >/dev/null
rm -rf /tmp/m/demo_avg && cp -r /work/main/adafocus/demo/assets/bundle /tmp/m/demo_avg
$AD profile /tmp/m/demo_avg --engine ort --threads 2 >/dev/null
G=$(python3 -c "import json,glob; p=json.load(open(glob.glob('/tmp/m/demo_avg/profiles/*.json')[0])); m=p['measured']; g,f=m['glance_only_ms'],m['full_ms']; print(','.join(f'{g+x*(f-g):.2f}ms' for x in (0.25,0.5,0.75)))")
echo "targets $G"
$AD calibrate thresholds /tmp/m/demo_avg --data /tmp/m/data9 --engine ort --threads 2 --budgets $G 2>/dev/null
