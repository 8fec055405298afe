{{/*
The chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "ime-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name, with the chart name unless it contains it.
*/}}
{{- define "ime-bridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ime-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "ime-bridge.labels" -}}
helm.sh/chart: {{ include "ime-bridge.chart" . }}
{{ include "ime-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ime-bridge
{{- end }}

{{/*
Labels that select the bridge's pod.
*/}}
{{- define "ime-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ime-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select the `helm test` pod (templates/tests/). It has no app.kubernetes.io/name, so that no
selector of the bridge's pod (Service, PodDisruptionBudget, NetworkPolicy) picks it up.
*/}}
{{- define "ime-bridge.testSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}

{{- define "ime-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ime-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ime-bridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
Does the chart create the credentials Secret? Only when it has a credential to put in it.
*/}}
{{- define "ime-bridge.createSecret" -}}
{{- $c := .Values.credentials -}}
{{- if and (not $c.existingSecret) (or $c.imePassword $c.imeToken $c.kafkaSaslPassword $c.schemaRegistryPassword $c.kafkaOauthClientSecret $c.kafkaSslKeyPassword) -}}
true
{{- end -}}
{{- end }}

{{- define "ime-bridge.secretName" -}}
{{- default (printf "%s-credentials" (include "ime-bridge.fullname" .)) .Values.credentials.existingSecret }}
{{- end }}

{{/*
A mapping without its null and empty-string values: optional keys left empty in values.yaml stay out
of the config file, so that the bridge's own defaults apply.
*/}}
{{- define "ime-bridge.compact" -}}
{{- $out := dict -}}
{{- range $key, $value := . -}}
{{- if not (or (kindIs "invalid" $value) (and (kindIs "string" $value) (eq $value ""))) -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end }}

{{/*
The bridge's config file. Secrets are dropped even if a schema-less install passed them: they reach the
bridge only as IME_BRIDGE_* variables from the Secret. In spool mode `buffer.spool_dir` is the persistent
volume's mount path.
*/}}
{{- define "ime-bridge.configFile" -}}
{{- $c := .Values.config -}}
# ime-bridge configuration, rendered by the ime-bridge Helm chart from its `config` values.
# Secrets are not here: IME_BRIDGE_IME__PASSWORD, IME_BRIDGE_IME__TOKEN, IME_BRIDGE_KAFKA__SASL_PASSWORD,
# IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET, IME_BRIDGE_KAFKA__SSL_KEY_PASSWORD and
# IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD come from the credentials Secret.
ime:
  {{- include "ime-bridge.compact" (omit $c.ime "password" "token") | nindent 2 }}
kafka:
  {{- include "ime-bridge.compact" (merge (include "ime-bridge.kafkaTlsFiles" . | fromYaml) (omit $c.kafka "sasl_password" "sasl_oauth_client_secret" "ssl_key_password")) | nindent 2 }}
{{- with $c.schema_registry }}
{{- if .url }}
schema_registry:
  {{- include "ime-bridge.compact" (omit . "password") | nindent 2 }}
{{- end }}
{{- end }}
buffer:
  {{- include "ime-bridge.compact" (omit $c.buffer "spool_dir") | nindent 2 }}
  {{- if eq (toString $c.buffer.overflow) "spool" }}
  {{- if not .Values.persistence.enabled }}
  {{- fail "config.buffer.overflow: spool needs persistence.enabled: true (the spool lives on the persistent volume)" }}
  {{- end }}
  spool_dir: {{ .Values.persistence.mountPath }}
  {{- end }}
metrics:
  {{- include "ime-bridge.compact" (pick $c.metrics "host" "port") | nindent 2 }}
{{- $coordination := omit ($c.coordination | default dict) "group_id" }}
{{- with include "ime-bridge.coordinationGroupId" . }}
{{- $_ := set $coordination "group_id" . }}
{{- end }}
{{- $coordination = include "ime-bridge.compact" $coordination }}
{{- if ne $coordination "{}" }}
coordination:
  {{- $coordination | nindent 2 }}
{{- end }}
log:
  {{- include "ime-bridge.compact" $c.log | nindent 2 }}
shutdown_timeout_seconds: {{ $c.shutdown_timeout_seconds }}
{{- end }}

{{/*
The bridge's coordination.group_id, empty when the replicas do not coordinate (one process owns every contract):
config.coordination.group_id when set, else `<namespace>-<fullname>` when coordination.enabled is true, or null
with replicaCount > 1. Rendering fails when coordination.enabled is false with several replicas (each would
publish every contract) or with a group id set.
*/}}
{{- define "ime-bridge.coordinationGroupId" -}}
{{- $explicit := (.Values.config.coordination | default dict).group_id | default "" -}}
{{- $enabled := (.Values.coordination | default dict).enabled -}}
{{- $replicas := int .Values.replicaCount -}}
{{- if and (kindIs "bool" $enabled) (not $enabled) -}}
{{- if gt $replicas 1 -}}
{{- fail (printf "replicaCount: %d needs coordination, but coordination.enabled is false: without a consumer group every replica would subscribe and publish every contract; set coordination.enabled to null (or true), or replicaCount to 1" $replicas) -}}
{{- end -}}
{{- if $explicit -}}
{{- fail "config.coordination.group_id is set but coordination.enabled is false: leave one of them out" -}}
{{- end -}}
{{- else if $explicit -}}
{{- $explicit -}}
{{- else if or $enabled (gt $replicas 1) -}}
{{- printf "%s-%s" .Release.Namespace (include "ime-bridge.fullname" .) -}}
{{- end -}}
{{- end }}

{{/*
The topology spread constraints of the pod: topologySpreadConstraints (one without labelSelector selects every
ime-bridge pod of the namespace), and with replicaCount > 1 replicaSpread's over the release's own pods unless a
given constraint has its topologyKey. A YAML list, empty when there are none.
*/}}
{{- define "ime-bridge.topologySpreadConstraints" -}}
{{- $constraints := list -}}
{{- $keys := dict -}}
{{- range $constraint := .Values.topologySpreadConstraints -}}
{{- if not (hasKey $constraint "labelSelector") -}}
{{- $constraint = merge (dict "labelSelector" (dict "matchLabels" (dict "app.kubernetes.io/name" (include "ime-bridge.name" $)))) $constraint -}}
{{- end -}}
{{- $constraints = append $constraints $constraint -}}
{{- $_ := set $keys (toString $constraint.topologyKey) true -}}
{{- end -}}
{{- $spread := .Values.replicaSpread -}}
{{- if and $spread.enabled (gt (int .Values.replicaCount) 1) (not (hasKey $keys $spread.topologyKey)) -}}
{{- $constraints = append $constraints (dict
  "maxSkew" (int $spread.maxSkew)
  "topologyKey" $spread.topologyKey
  "whenUnsatisfiable" $spread.whenUnsatisfiable
  "labelSelector" (dict "matchLabels" (include "ime-bridge.selectorLabels" . | fromYaml))) -}}
{{- end -}}
{{- if $constraints -}}
{{- toYaml $constraints -}}
{{- end -}}
{{- end }}

{{/*
With kafkaTls.secretName: config.kafka.ssl_certfile, ssl_keyfile and ssl_cafile as the files of its mount (a
YAML mapping, empty without it). Rendering fails when `config` sets one of them too, or when the protocol has
no TLS.
*/}}
{{- define "ime-bridge.kafkaTlsFiles" -}}
{{- $tls := .Values.kafkaTls -}}
{{- $kafka := .Values.config.kafka -}}
{{- if $tls.secretName -}}
{{- if not (has (toString $kafka.security_protocol) (list "SSL" "SASL_SSL")) -}}
{{- fail "kafkaTls.secretName needs config.kafka.security_protocol SSL or SASL_SSL" -}}
{{- end -}}
{{- $files := dict -}}
{{- if $tls.certFile -}}
{{- $_ := set $files "ssl_certfile" (printf "%s/%s" $tls.mountPath $tls.certFile) -}}
{{- with $tls.keyFile -}}
{{- $_ := set $files "ssl_keyfile" (printf "%s/%s" $tls.mountPath .) -}}
{{- end -}}
{{- end -}}
{{- with $tls.caFile -}}
{{- $_ := set $files "ssl_cafile" (printf "%s/%s" $tls.mountPath .) -}}
{{- end -}}
{{- range $key, $_ := $files -}}
{{- if index $kafka $key -}}
{{- fail (printf "config.kafka.%s: leave it unset, kafkaTls points it at the mounted Secret" $key) -}}
{{- end -}}
{{- end -}}
{{- toYaml $files -}}
{{- end -}}
{{- end }}

{{/*
terminationGracePeriodSeconds: derived from the bridge's shutdown budget, or the configured value when
it is longer than that budget; rendering fails otherwise.
*/}}
{{- define "ime-bridge.terminationGracePeriodSeconds" -}}
{{- $budget := float64 .Values.config.shutdown_timeout_seconds -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (ceil $budget | int) 10 -}}
{{- else -}}
{{- $grace := .Values.terminationGracePeriodSeconds -}}
{{- if le (float64 $grace) $budget -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than config.shutdown_timeout_seconds (%v): the kubelet would kill the bridge before it has flushed" $grace $budget) -}}
{{- end -}}
{{- int $grace -}}
{{- end -}}
{{- end }}

{{/*
The pod template shared by the Deployment and the StatefulSet.
*/}}
{{- define "ime-bridge.podTemplate" -}}
metadata:
  labels:
    {{- include "ime-bridge.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "ime-bridge.configFile" . | sha256sum }}
    {{- if include "ime-bridge.createSecret" . }}
    checksum/secret: {{ include "ime-bridge.secretData" . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ime-bridge.serviceAccountName" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "ime-bridge.terminationGracePeriodSeconds" . }}
  containers:
    - name: ime-bridge
      image: {{ include "ime-bridge.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --config
        - /etc/ime-bridge/config.yaml
      {{- $secretEnv := include "ime-bridge.secretEnv" . }}
      {{- if or $secretEnv .Values.extraEnv }}
      env:
        {{- with $secretEnv }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with .Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .Values.config.metrics.port }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml .Values.startupProbe | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/ime-bridge
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if .Values.persistence.enabled }}
        - name: spool
          mountPath: {{ .Values.persistence.mountPath }}
        {{- end }}
        {{- if .Values.kafkaTls.secretName }}
        - name: kafka-tls
          mountPath: {{ .Values.kafkaTls.mountPath }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "ime-bridge.fullname" . }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- with .Values.kafkaTls.secretName }}
    - name: kafka-tls
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "ime-bridge.topologySpreadConstraints" . }}
  topologySpreadConstraints:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Credentials as IME_BRIDGE_* variables from the Secret: every key of an existing Secret (optional, so it
may hold only some), or the keys the chart put in its own Secret.
*/}}
{{- define "ime-bridge.secretEnv" -}}
{{- $c := .Values.credentials -}}
{{- $keys := $c.existingSecretKeys -}}
{{- $name := include "ime-bridge.secretName" . -}}
{{- $vars := list
  (list "IME_BRIDGE_IME__PASSWORD" $keys.imePassword $c.imePassword)
  (list "IME_BRIDGE_IME__TOKEN" $keys.imeToken $c.imeToken)
  (list "IME_BRIDGE_KAFKA__SASL_PASSWORD" $keys.kafkaSaslPassword $c.kafkaSaslPassword)
  (list "IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD" $keys.schemaRegistryPassword $c.schemaRegistryPassword)
  (list "IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET" $keys.kafkaOauthClientSecret $c.kafkaOauthClientSecret)
  (list "IME_BRIDGE_KAFKA__SSL_KEY_PASSWORD" $keys.kafkaSslKeyPassword $c.kafkaSslKeyPassword) -}}
{{- range $vars }}
{{- if or $c.existingSecret (index . 2) }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ index . 1 }}
      optional: {{ not (empty $c.existingSecret) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The data of the Secret the chart creates: only the credentials that are set, under the same keys an
existing Secret would use.
*/}}
{{- define "ime-bridge.secretData" -}}
{{- $c := .Values.credentials -}}
{{- $keys := $c.existingSecretKeys -}}
{{- with $c.imePassword }}
{{ $keys.imePassword }}: {{ . | b64enc }}
{{- end }}
{{- with $c.imeToken }}
{{ $keys.imeToken }}: {{ . | b64enc }}
{{- end }}
{{- with $c.kafkaSaslPassword }}
{{ $keys.kafkaSaslPassword }}: {{ . | b64enc }}
{{- end }}
{{- with $c.schemaRegistryPassword }}
{{ $keys.schemaRegistryPassword }}: {{ . | b64enc }}
{{- end }}
{{- with $c.kafkaOauthClientSecret }}
{{ $keys.kafkaOauthClientSecret }}: {{ . | b64enc }}
{{- end }}
{{- with $c.kafkaSslKeyPassword }}
{{ $keys.kafkaSslKeyPassword }}: {{ . | b64enc }}
{{- end }}
{{- end }}
