-- Shared helpers, prepended to every script of this directory when it is loaded
-- (qlm/store/scripts.py), after the line that sets QUEUE_LOG_MAXLEN. Key names follow
-- qlm/store/keys.py; `prefix` is the deployment's key prefix, passed to each script in
-- ARGV.

local function req_key(prefix, id) return prefix .. 'req:' .. id end
local function group_key(prefix, group) return prefix .. 'group:' .. group end
local function running_key(prefix, worker) return prefix .. 'running:' .. worker end
local function stream_key(prefix, id) return prefix .. 'stream:' .. id end
local function queue_log_key(prefix) return prefix .. 'queue:log' end

-- Log one change of a group's membership on the queue log (qlm/store/keys.py):
-- op '+' (`id` queued in `group`) or '-' (`id` left it). Entry ids 0-1, 0-2, ... number
-- every change ever logged; the oldest entries are trimmed beyond QUEUE_LOG_MAXLEN.
local function log_change(log_key, op, group, id)
  redis.call('XADD', log_key, 'MAXLEN', '~', QUEUE_LOG_MAXLEN, '0-*', 'o', op, 'g', group, 'i', id)
end

-- The model of a group key "model|slo_class|window" or "model|slo_class|window|tenant"
-- (qlm.core.types.GroupKey; the model may contain '|', the tenant is percent-encoded,
-- the window is an integer where the 3-part form has its class).
local function model_of(group)
  return string.match(group, '^(.*)|[^|]*|%-?%d+|[^|]*$')
      or string.match(group, '^(.*)|[^|]*|[^|]*$')
end

-- For each group of `groups` (a list), whether it has a queued request (is in the index).
local function nonempty_groups(prefix, groups)
  local out = {}
  for start = 1, #groups, 1000 do
    local last = math.min(start + 999, #groups)
    local scores = redis.call('ZMSCORE', prefix .. 'groups', unpack(groups, start, last))
    for i = start, last do out[i] = scores[i - start + 1] ~= false end
  end
  return out
end

-- Re-score the group in the index by its head, or drop it when it is empty.
local function refresh_group_index(prefix, group)
  local head = redis.call('ZRANGE', group_key(prefix, group), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', prefix .. 'groups', group)
  else
    redis.call('ZADD', prefix .. 'groups', head[2], group)
  end
end

-- Queue `id` in `group` with score `deadline_at`; the index keeps the earliest deadline.
local function add_to_group(prefix, id, group, deadline_at)
  redis.call('ZADD', group_key(prefix, group), deadline_at, id)
  redis.call('ZADD', prefix .. 'groups', 'LT', deadline_at, group)
  log_change(queue_log_key(prefix), '+', group, id)
end

-- Take queued `id` out of `group` (claimed, cancelled, rejected) and re-score the index.
local function remove_from_group(prefix, id, group)
  if redis.call('ZREM', group_key(prefix, group), id) == 1 then
    log_change(queue_log_key(prefix), '-', group, id)
  end
  refresh_group_index(prefix, group)
end

-- The fields of a running request that move while it runs, as the snapshot reads them
-- (qlm.store.store.RUNNING_CHANGING_FIELDS joined by '|', a missing one as ''). Every
-- script that sets one of them on a running request (pull, claim, append_tokens) also
-- sets them, so joined, in the record's `run` field: the snapshot then reads one field
-- per running request instead of four (a record without it, written before, is read
-- field by field).
local function run_row(arrival_at, num_generated, started_at, first_token_at)
  return (arrival_at or '') .. '|' .. (num_generated or '') .. '|' .. (started_at or '') .. '|'
    .. (first_token_at or '')
end

-- Forget the lease and the worker's running entry of `id`.
local function release_lease(prefix, id, worker)
  redis.call('ZREM', prefix .. 'leases', id)
  if worker and worker ~= '' then redis.call('SREM', running_key(prefix, worker), id) end
end

-- Record a terminal state, close the token stream with an end entry, start both TTLs.
-- opts: {now, record_ttl_s, stream_ttl_s, stream_maxlen} as strings from ARGV.
local function finish_record(prefix, id, state, reason, opts)
  local rk = req_key(prefix, id)
  local sk = stream_key(prefix, id)
  redis.call('HSET', rk, 'state', state, 'finished_at', opts.now, 'error', reason,
    'lease_expires_at', '')
  redis.call('XADD', sk, 'MAXLEN', '~', opts.stream_maxlen, '*', 'end', state, 'error', reason,
    'at', opts.now)
  if tonumber(opts.stream_ttl_s) > 0 then redis.call('EXPIRE', sk, opts.stream_ttl_s) end
  if tonumber(opts.record_ttl_s) > 0 then redis.call('EXPIRE', rk, opts.record_ttl_s) end
end

-- Put a running request back in its group (eviction or expired lease), keeping progress.
local function requeue_record(prefix, id, group, deadline_at)
  redis.call('HSET', req_key(prefix, id), 'state', 'queued', 'worker', '', 'lease_expires_at', '')
  redis.call('HINCRBY', req_key(prefix, id), 'num_evictions', 1)
  add_to_group(prefix, id, group, deadline_at)
end

-- The record hash at `rk` as one JSON object of strings (cheaper to send and parse
-- than HGETALL's flat array).
local function record_json(rk)
  local flat = redis.call('HGETALL', rk)
  local record = {}
  for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
  return cjson.encode(record)
end

-- End of shared helpers.
