#!/bin/bash
# Builds the logs the task reads (run by the Dockerfile, no network needed).
mkdir -p logs
for i in 1 2 3; do echo "2025-01-0${i}T10:00:00 ERROR api timeout" >> logs/api.log; done
echo "2025-01-01T11:00:00 INFO api started" >> logs/api.log
for i in 1 2; do echo "2025-01-0${i}T12:00:00 ERROR db deadlock" >> logs/db.log; done
echo "2025-01-03T09:00:00 WARN db slow query" >> logs/db.log
for i in 1 2; do echo "2025-01-0${i}T13:00:00 ERROR auth bad token" >> logs/auth.log; done
echo "2025-01-02T08:00:00 INFO cache warm" > logs/cache.log
