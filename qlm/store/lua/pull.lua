-- pull: a worker takes up to N queued requests of its active model from the head
-- of its virtual queue and holds them under a lease. One round trip.
--
-- KEYS[1]  vq:{worker}        the worker's virtual queue (list of group keys, head first)
-- KEYS[2]  running:{worker}   ids running on the worker
-- KEYS[3]  leases             lease sorted set (score = lease_expires_at)
-- KEYS[4]  workers            set of known workers
-- KEYS[5]  forecast           group key → the group's forecast (scheduler's last decision)
-- ARGV[1]  prefix             key prefix (group:{group}, groups, queue:log and req:{id}
--                             are derived)
-- ARGV[2]  worker             worker id
-- ARGV[3]  model              the worker's active model
-- ARGV[4]  max_requests       N > 0
-- ARGV[5]  now                started_at of the pulled requests
-- ARGV[6]  lease_expires_at   their lease expiry
--
-- Walks the virtual queue head first; groups with no queued request are skipped
-- (found with one ZMSCORE on the index). From each group pops its lowest scores
-- (earliest deadlines) until N requests are taken, and stops at the first group of
-- another model: a model swap must come first, pulling past it would reorder the
-- queue (as qlm.core.pulls.plan_pulls). Each pulled record gets state=running,
-- worker, started_at, lease_expires_at, run (_lib.lua's run_row), num_pulls+1, and,
-- when its group has a
-- forecast and the request has no first token yet, that forecast with the request's
-- place in the group at the pull (forecast, forecast_rank, forecast_size): the last
-- prediction made before it started (a request evicted after its first token keeps the
-- one made before that token).
-- Returns the records now running as JSON objects of strings, in pull order.

local prefix, worker, model = ARGV[1], ARGV[2], ARGV[3]
local remaining = tonumber(ARGV[4])
local now, lease = ARGV[5], ARGV[6]
local pulled = {}
redis.call('SADD', KEYS[4], worker)
local order = redis.call('LRANGE', KEYS[1], 0, -1)
local queued = nonempty_groups(prefix, order)
for i, group in ipairs(order) do
  if remaining <= 0 then break end
  if queued[i] and model_of(group) ~= model then break end
  if queued[i] then
    local size = redis.call('ZCARD', group_key(prefix, group))
    local forecast = redis.call('HGET', KEYS[5], group)
    local popped = redis.call('ZPOPMIN', group_key(prefix, group), remaining)
    if #popped > 0 then
      for j = 1, #popped, 2 do
        local id = popped[j]
        log_change(queue_log_key(prefix), '-', group, id)
        local rk = req_key(prefix, id)
        local kept = redis.call('HMGET', rk, 'arrival_at', 'num_generated', 'first_token_at')
        local first_token_at = kept[3]
        redis.call('HSET', rk, 'state', 'running', 'worker', worker, 'started_at', now,
          'lease_expires_at', lease, 'run', run_row(kept[1], kept[2], now, first_token_at))
        if forecast and (not first_token_at or first_token_at == '') then
          redis.call('HSET', rk, 'forecast', forecast, 'forecast_rank', (j - 1) / 2,
            'forecast_size', size)
        end
        redis.call('HINCRBY', rk, 'num_pulls', 1)
        redis.call('ZADD', KEYS[3], lease, id)
        redis.call('SADD', KEYS[2], id)
        pulled[#pulled + 1] = record_json(rk)
      end
      remaining = remaining - #popped / 2
      refresh_group_index(prefix, group)
    end
  end
end
return pulled
