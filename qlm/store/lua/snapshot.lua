-- snapshot: read, atomically, the queue's membership (all of it, or only what changed
-- since a position of the queue log), every worker's virtual queue and running ids with
-- the fields of their records that move while they run, and, when only the changes are
-- read, the records of the ids they name. Read-only; when the membership is read whole,
-- the records of its ids (and of running ids new to the caller) are read afterwards.
--
-- KEYS[1]  groups             the group index
-- KEYS[2]  workers            set of known workers
-- KEYS[3]  queue:log          the queue log (qlm/store/keys.py)
-- ARGV[1]  prefix             key prefix (group:{group}, vq:{worker}, running:{worker} derived)
-- ARGV[2]  after              the log position the caller's copy of the membership
--                             reflects, or '' (no copy: read it all)
-- ARGV[3]  n                  how many of the fields that follow are running fields
-- ARGV[4 .. 3+n] fields       the record fields to read of each running request
--                             (qlm.store.store.RUNNING_CHANGING_FIELDS)
-- ARGV[4+n ..] record fields  the record fields to read of each id in `changes`
--                             (qlm.store.records.SCHEDULING_FIELDS)
--
-- Returns one JSON text {position, changes, groups, workers, records}:
--   position  the number of the log's last entry (0 when the log is empty);
--   changes   the log after `after`, flat: [op, group, id, op, group, id, ...] in log
--             order; false when the membership is read whole instead (`after` is '',
--             or ahead of the log, or entries after it were trimmed away);
--   groups    in index order (earliest deadline first): [group, [id, ...]] (ids by
--             score) when read whole, else [group, number of queued ids];
--   workers   [[worker, [vq group, ...], [running id, ...], [row, ...]], ...]: each
--             running id's row is the values of `fields` in its record joined by '|'
--             (a missing field reads as ''), or false when its record is missing: the
--             record's `run` field, which holds them so joined (_lib.lua's run_row),
--             else (a record written before) the fields themselves;
--   records   {id: [value of each record field, ...]} of every id whose last change in
--             `changes` queued it, and of every running id that `changes` names (it
--             started running since `after`); a missing record or field reads as false.
--             Empty when the membership is read whole.
-- An empty list or object may be encoded as {} (cjson).

local function entry_number(id) return tonumber(string.match(id, '^0%-(%d+)$')) end
local prefix, after = ARGV[1], tonumber(ARGV[2])
local position = 0
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #last > 0 then
  position = entry_number(last[1][1])
elseif redis.call('EXISTS', KEYS[3]) == 1 then  -- trimmed empty: its last id stays
  local info = redis.call('XINFO', 'STREAM', KEYS[3])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then position = entry_number(info[i + 1]) end
  end
end

local changes = false
if after and after <= position then
  changes = {}
  if after < position then
    local entries = redis.call('XRANGE', KEYS[3], '(0-' .. after, '+')
    if #entries > 0 and entry_number(entries[1][1]) == after + 1 then
      for _, entry in ipairs(entries) do
        local f = entry[2]  -- o, op, g, group, i, id
        changes[#changes + 1] = f[2]; changes[#changes + 1] = f[4]; changes[#changes + 1] = f[6]
      end
    else
      changes = false  -- trimmed: the caller's copy cannot be brought up to date
    end
  end
end

local groups = {}
for _, group in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local members
  if changes then
    members = redis.call('ZCARD', group_key(prefix, group))
  else
    members = redis.call('ZRANGE', group_key(prefix, group), 0, -1)
  end
  groups[#groups + 1] = {group, members}
end
local num_fields = tonumber(ARGV[3])
local fields = {unpack(ARGV, 4, 3 + num_fields)}
local record_fields = {unpack(ARGV, 4 + num_fields)}
-- the ids `changes` names, with the op of their last change
local changed = {}
if changes then
  for i = 1, #changes, 3 do changed[changes[i + 2]] = changes[i] end
end
local records = {}
for id, op in pairs(changed) do
  if op == '+' then records[id] = redis.call('HMGET', req_key(prefix, id), unpack(record_fields)) end
end
local workers = {}
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local ids = redis.call('SMEMBERS', running_key(prefix, worker))
  local rows = {}
  for i, id in ipairs(ids) do
    local rk = req_key(prefix, id)
    local row = redis.call('HGET', rk, 'run')  -- kept by pull, claim and append_tokens
    if not row then  -- no record, or one written before records kept `run`
      local values = redis.call('HMGET', rk, unpack(fields))
      if values[1] then
        for j = 2, #values do if not values[j] then values[j] = '' end end
        row = table.concat(values, '|')
      end
    end
    rows[i] = row
    if changed[id] then records[id] = redis.call('HMGET', rk, unpack(record_fields)) end
  end
  workers[#workers + 1] = {worker, redis.call('LRANGE', prefix .. 'vq:' .. worker, 0, -1), ids,
    rows}
end
return cjson.encode({position, changes, groups, workers, records})
